// Message formatting and throwing for check.h, out of line and without iostreams.
#include "check.h"

#include <c10/util/Exception.h>

#include <cstdio>

namespace enat {

std::string text(c10::IntArrayRef values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(values[i]);
  }
  return out + "]";
}

std::string text(c10::ScalarType dtype) { return c10::toString(dtype); }

std::string text(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%g", value);
  return buffer;
}

std::string describe(const at::Tensor& t) {
  return text(t.scalar_type()) + text(t.sizes()) + " on " + t.device().str();
}

void throw_value_error(const std::string& message) { C10_THROW_ERROR(ValueError, message); }

void throw_type_error(const std::string& message) { C10_THROW_ERROR(TypeError, message); }

}  // namespace enat

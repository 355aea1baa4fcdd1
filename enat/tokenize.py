"""python -m enat.tokenize: a folder of class folders of images -> a token file for training ENAT.

    python -m enat.tokenize train/ tokens_256.npy --vq-checkpoint vqgan_jax_strongaug.ckpt --flip
    python -m enat.tokenize train/ tokens_512.npy --vq-checkpoint vqgan_jax_strongaug.ckpt --resolution 512

Input: IMAGE_DIR/<class name>/<image files>; class ids are the positions of the class folder names in
sorted order (written, one name per line, to OUT with the suffix .classes.txt). Each image is center
cropped and resized the ADM way (enat.cli.center_crop_arr, docs/VQ.md) to --resolution px, RGB in [0, 1], and
encoded by the VQGAN.

Output (docs/VQ.md, "Token file"): a .npy int64 array of shape (N, 1 + L), one row per image: the class
id, then the L = (resolution / 16)^2 token ids in row-major grid order. With --flip each image's row is
followed by the row of its horizontally mirrored copy. Rows follow the sorted class folders and, within a
class, the sorted file names. Files that cannot be read as images are skipped, counted and listed at the
end (and in OUT with the suffix .unreadable.txt); nothing is dropped silently.
"""

import argparse
import os
import sys

import numpy as np
import torch

from .cli import (DTYPES, CommandError, add_device_args, add_workers_arg, default_device, image_batches, load_vq,
                  progress_bar, run_command)


def list_images(root):
    """(classes, [(path, class id)], ignored files outside class folders), all sorted."""
    if not os.path.isdir(root):
        raise CommandError(f"image folder not found: {root!r}")
    entries = sorted(os.listdir(root))
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]
    ignored = [e for e in entries if not os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]
    files = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            files += [(os.path.join(dirpath, f), label) for f in sorted(filenames) if not f.startswith(".")]
    if not classes:
        raise CommandError(f"{root!r} holds no class folders (expected {root}/<class name>/<images>)")
    return classes, files, ignored


def build_parser():
    p = argparse.ArgumentParser(prog="python -m enat.tokenize", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("image_dir", help="a folder with one subfolder of images per class")
    p.add_argument("out", help="the token file to write (.npy)")
    p.add_argument("--resolution", type=int, default=256, help="256 or 512 (default: %(default)s)")
    p.add_argument("--flip", action="store_true", help="also encode each image mirrored horizontally (one more row)")
    p.add_argument("--batch-size", type=int, default=64, help="images per VQGAN batch (default: %(default)s)")
    add_workers_arg(p)
    add_device_args(p, default_dtype="fp32")
    return p


def run(args):
    if args.batch_size < 1 or args.workers < 0:
        raise CommandError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size}, {args.workers}")
    device = torch.device(args.device or default_device())
    vqgan = load_vq(args, device, DTYPES[args.dtype])
    if args.resolution < vqgan.downsample or args.resolution % vqgan.downsample:
        raise CommandError(f"--resolution must be a positive multiple of {vqgan.downsample}, got {args.resolution}")
    classes, files, ignored = list_images(args.image_dir)
    L = (args.resolution // vqgan.downsample) ** 2
    per_image = 2 if args.flip else 1
    rows = np.zeros((len(files) * per_image, 1 + L), dtype=np.int64)
    kept = np.zeros(len(files), dtype=bool)
    unreadable = []
    with progress_bar("enat.tokenize", len(files), "img", enabled=not args.no_progress) as bar:
        for items in image_batches(files, args.resolution, args.batch_size, args.workers):
            good = []
            for i, label, arr, error in items:
                if arr is None:
                    unreadable.append((files[i][0], error))
                else:
                    good.append((i, label, arr))
            if good:
                pixels = torch.from_numpy(np.stack([a for _, _, a in good])).to(device)
                images = pixels.permute(0, 3, 1, 2).float().div_(255)
                if args.flip:  # each image followed by its mirror
                    images = torch.stack([images, images.flip(-1)], dim=1).flatten(0, 1)
                with torch.no_grad():
                    ids = vqgan.encode(images).view(len(good), per_image, L).cpu().numpy()
                for (i, label, _), image_ids in zip(good, ids):
                    rows[i * per_image:(i + 1) * per_image, 0] = label
                    rows[i * per_image:(i + 1) * per_image, 1:] = image_ids
                    kept[i] = True
            bar.update(len(items))
    rows = rows[np.repeat(kept, per_image)]
    out = args.out if args.out.endswith(".npy") else args.out + ".npy"
    stem = out[:-len(".npy")]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.save(out, rows)
    with open(stem + ".classes.txt", "w") as f:
        f.write("".join(name + "\n" for name in classes))
    print(f"wrote {out}: {rows.shape[0]} rows x (1 label + {L} ids), int64; {int(kept.sum())} images of "
          f"{len(files)} files in {len(classes)} classes{', each also mirrored' if args.flip else ''}; "
          f"class names in {stem}.classes.txt")
    if ignored:
        print(f"ignored {len(ignored)} files outside class folders: {', '.join(ignored[:10])}"
              f"{' ...' if len(ignored) > 10 else ''}")
    if unreadable:
        with open(stem + ".unreadable.txt", "w") as f:
            f.write("".join(f"{path}\t{error}\n" for path, error in unreadable))
        print(f"skipped {len(unreadable)} unreadable files (listed in {stem}.unreadable.txt):", file=sys.stderr)
        for path, error in unreadable[:20]:
            print(f"  {path}: {error}", file=sys.stderr)
        if len(unreadable) > 20:
            print(f"  ... and {len(unreadable) - 20} more", file=sys.stderr)
    return rows


def main(argv=None):
    return run_command("python -m enat.tokenize", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

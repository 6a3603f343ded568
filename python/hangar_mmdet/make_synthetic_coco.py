"""Generates a synthetic two-class COCO detection data set, or one large image for tiled detection.

Data set mode writes DIR/{train,valid,test}/ (a 70/20/10 split), each with PNG images and an
annotations_coco.json (category ids start at 1):

    python make_synthetic_coco.py --out DIR [--images 32] [--size 128] [--seed 0]

Big image mode writes one image larger than a detection patch, with the same object sizes as the
data set, and PATH.truth.json listing the true boxes ([x1, y1, x2, y2], pixels) and class names:

    python make_synthetic_coco.py --big-image PATH [--width 1800] [--height 1500] [--objects 6]

The two classes differ in both colour and shape so that a tiny model learns them in a few minutes
on a CPU. Everything is deterministic given --seed.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("red_square", "blue_disc")
MIN_OBJECT, MAX_OBJECT = 20, 50  # object side / diameter in pixels
GAP = 4  # minimum free pixels between two objects


def background(rng, width, height):
    """A grey background of random brightness with Gaussian pixel noise, as an HxWx3 float array."""
    level = rng.uniform(80, 176)
    tint = rng.uniform(-10, 10, size=3)
    noise = rng.normal(0, 12, size=(height, width, 3))
    return np.full((height, width, 3), level) + tint + noise


def draw(img, rng, class_name, x, y, size):
    """Paints one object whose bounding box is (x, y, size, size)."""
    if class_name == "red_square":
        colour = (rng.uniform(190, 255), rng.uniform(0, 60), rng.uniform(0, 60))
        mask = np.ones((size, size), dtype=bool)
    else:
        colour = (rng.uniform(0, 60), rng.uniform(0, 60), rng.uniform(190, 255))
        centre = (size - 1) / 2
        yy, xx = np.mgrid[0:size, 0:size]
        mask = (yy - centre) ** 2 + (xx - centre) ** 2 <= (size / 2) ** 2
    patch = img[y:y + size, x:x + size]
    patch[mask] = np.asarray(colour) + rng.normal(0, 8, size=(int(mask.sum()), 3))


def overlaps(box, boxes):
    x, y, s = box
    return any(x < bx + bs + GAP and bx < x + s + GAP and y < by + bs + GAP and by < y + s + GAP
               for bx, by, bs in boxes)


def place(rng, width, height, count, taken=(), avoid=lambda box: False):
    """Picks up to `count` non-overlapping square boxes (x, y, size) inside the image."""
    boxes = list(taken)
    placed = []
    for _ in range(count * 200):
        if len(placed) == count:
            break
        size = int(rng.integers(MIN_OBJECT, MAX_OBJECT + 1))
        box = (int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1)),
               size)
        if not overlaps(box, boxes) and not avoid(box):
            boxes.append(box)
            placed.append(box)
    return placed


def save(img, path):
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


def split_sizes(n):
    """70/20/10, with at least one image in every split."""
    valid = max(1, round(0.2 * n))
    test = max(1, round(0.1 * n))
    return n - valid - test, valid, test


def make_dataset(out, images, size, seed):
    if images < 3:
        sys.exit("error: --images must be at least 3 (one image per split)")
    if size < MAX_OBJECT + 2 * GAP:
        sys.exit(f"error: --size must be at least {MAX_OBJECT + 2 * GAP} to fit the objects")
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, name in enumerate(CLASSES)]
    start = 0
    for split, count in zip(("train", "valid", "test"), split_sizes(images)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        coco = {"images": [], "annotations": [], "categories": categories}
        for image_id in range(1, count + 1):
            file_name = f"img_{start + image_id - 1:04d}.png"
            img = background(rng, size, size)
            # Two to five objects (as many as fit): more signal per training step.
            for x, y, s in place(rng, size, size, int(rng.integers(2, 6))):
                category = int(rng.integers(len(CLASSES)))
                draw(img, rng, CLASSES[category], x, y, s)
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": image_id,
                    "category_id": category + 1, "bbox": [x, y, s, s], "area": s * s, "iscrowd": 0,
                })
            save(img, folder / file_name)
            coco["images"].append(
                {"id": image_id, "file_name": file_name, "width": size, "height": size})
        (folder / "annotations_coco.json").write_text(json.dumps(coco, indent=1))
        start += count
        print(f"{split}: {count} images, {len(coco['annotations'])} objects in {folder}")


def make_big_image(path, width, height, objects, patch_size, seed):
    """Places one object across each interior tile edge (x = patch_size, y = patch_size: the far
    edges of the first tiles, which exist for any overlap) and the others clear of those edges."""
    if max(width, height) <= patch_size:
        sys.exit(f"error: the image must exceed --patch-size ({patch_size}) in some dimension")
    rng = np.random.default_rng(seed)
    img = background(rng, width, height)
    seams = []
    if width > patch_size:
        size = 40
        seams.append((patch_size - size // 2, int(rng.integers(0, height - size + 1)), size))
    if height > patch_size and len(seams) < objects:
        size = 36
        # Left of x = patch_size - 2 * size, so it never touches the first seam object.
        seams.append((int(rng.integers(0, min(width, patch_size) - 2 * size)),
                      patch_size - size // 2, size))
    seams = seams[:objects]

    def near_edge(box):
        x, y, s = box
        return (x - 16 < patch_size < x + s + 16) or (y - 16 < patch_size < y + s + 16)

    boxes = seams + place(rng, width, height, objects - len(seams), seams, near_edge)
    truth = []
    for i, (x, y, s) in enumerate(boxes):
        class_name = CLASSES[i % len(CLASSES)]  # both classes always present
        draw(img, rng, class_name, x, y, s)
        truth.append({"bbox": [x, y, x + s, y + s], "class_name": class_name,
                      "across_tile_edge": i < len(seams)})
    path.parent.mkdir(parents=True, exist_ok=True)
    save(img, path)
    truth_path = Path(f"{path}.truth.json")
    truth_path.write_text(json.dumps(
        {"image": str(path), "width": width, "height": height, "objects": truth}, indent=1))
    print(f"wrote {path} ({width}x{height}, {len(truth)} objects) and {truth_path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", type=Path, help="data set folder to create")
    mode.add_argument("--big-image", type=Path, help="large image to create (PNG, JPEG or TIFF)")
    parser.add_argument("--images", type=int, default=32, help="data set: number of images")
    parser.add_argument("--size", type=int, default=128, help="data set: image side in pixels")
    parser.add_argument("--width", type=int, default=1800, help="big image: width")
    parser.add_argument("--height", type=int, default=1500, help="big image: height")
    parser.add_argument("--objects", type=int, default=6, help="big image: number of objects")
    parser.add_argument("--patch-size", type=int, default=1280,
                        help="big image: detection patch size, to put objects across tile edges")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out:
        make_dataset(args.out, args.images, args.size, args.seed)
    else:
        make_big_image(args.big_image, args.width, args.height, args.objects, args.patch_size,
                       args.seed)


if __name__ == "__main__":
    main()

"""Runs an MMDetection model over one image, in overlapping tiles when the image is large.

    python detect.py --image PATH --config CFG --checkpoint CKPT --out-dir DIR
                     [--score-threshold 0.3] [--device cpu] [--patch-size 1280] [--overlap 0.25]
                     [--nms-iou 0.25]

An image larger than --patch-size in either dimension is cut into patch-size tiles that overlap by
the --overlap fraction (the last tile of a row or column lies flush with the border); smaller
images run in one pass. Tiles are not resized here (the config's test pipeline decides). Boxes
are shifted to image coordinates; detections below --score-threshold are dropped, and so are
boxes at an edge between two tiles that lie within the neighbouring tile (objects cut by the
edge, which the neighbour sees whole); the rest are merged by class-wise NMS at --nms-iou (also
in one-pass mode, so results do not depend on whether an image was tiled). Writes
DIR/detection_bboxes.json:

    {"metadata": {"image", "width", "height", "patch_size", "overlap", "tiles", "score_threshold",
                  "nms_iou", "config", "checkpoint", "device", "classes"},
     "detections": [{"bbox": [x1, y1, x2, y2], "score": s, "label": l, "class_name": name}]}

Detections are sorted by descending score. Exit status 0 on success; otherwise 1 (2 for bad
arguments) with the reason on stderr.
"""

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

OUTPUT = "detection_bboxes.json"
# A box edge this close (pixels) to a tile edge counts as touching it.
EDGE_MARGIN = 8


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, required=True, help="PNG, JPEG, TIFF, ...")
    parser.add_argument("--config", type=Path, required=True, help="the model's config file")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the model's weights")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--patch-size", type=int, default=1280)
    parser.add_argument("--overlap", type=float, default=0.25,
                        help="fraction of a patch, in [0, 1)")
    parser.add_argument("--nms-iou", type=float, default=0.25)
    args = parser.parse_args()
    if args.patch_size < 32:
        parser.error("--patch-size must be at least 32")
    if not 0 <= args.overlap < 1:
        parser.error("--overlap must be in [0, 1)")
    if not 0 <= args.score_threshold <= 1 or not 0 < args.nms_iou <= 1:
        parser.error("--score-threshold must be in [0, 1] and --nms-iou in (0, 1]")
    for name in ("image", "config", "checkpoint"):
        path = getattr(args, name)
        if not path.is_file():
            parser.error(f"--{name} {path}: no such file")
    return args


def read_image(path):
    """The image as an HxWx3 uint8 BGR array (the channel order mmdet's pipelines load)."""
    import cv2
    import numpy as np
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:  # formats OpenCV lacks; PIL also reads e.g. some TIFF compressions
        from PIL import Image
        Image.MAX_IMAGE_PIXELS = None  # large images are the point here
        try:
            with Image.open(path) as pil:
                img = np.ascontiguousarray(np.asarray(pil.convert("RGB"))[:, :, ::-1])
        except Exception as error:
            raise ValueError(f"cannot read image {path}: {error}") from error
    return img


def tile_starts(length, patch, stride):
    """Offsets of the tiles along one axis; the last tile ends at the border."""
    if length <= patch:
        return [0]
    return list(range(0, length - patch, stride)) + [length - patch]


def tile_offsets(width, height, patch, overlap):
    """Tile offsets along x and along y. Tiles are patch x patch, or as large as the image
    along an axis where it is not larger than a patch."""
    stride = max(1, round(patch * (1 - overlap)))
    return tile_starts(width, patch, stride), tile_starts(height, patch, stride)


def cut_by_inner_edge(lo, hi, starts, i, patch):
    """Along one axis, the boxes [lo, hi] of tile i that touch an edge it shares with a
    neighbouring tile while lying within that neighbour's span: objects cut by the edge (or right
    at it), which the neighbour sees whole. NMS alone would keep such fragments, as they overlap
    the whole object's box too little, or carry another class."""
    cut = lo.new_zeros(lo.shape, dtype=bool)
    if i + 1 < len(starts):  # an edge on the far side
        cut |= (hi >= starts[i] + patch - EDGE_MARGIN) & (lo >= starts[i + 1])
    if i > 0:  # an edge on the near side
        cut |= (lo <= starts[i] + EDGE_MARGIN) & (hi <= starts[i - 1] + patch)
    return cut


def detect(args):
    import torch
    from mmdet.apis import inference_detector, init_detector
    from torchvision.ops import batched_nms

    img = read_image(args.image)
    height, width = img.shape[:2]
    try:
        model = init_detector(str(args.config), str(args.checkpoint), device=args.device)
    except Exception as error:
        raise RuntimeError(f"cannot load the model from config {args.config} and checkpoint "
                           f"{args.checkpoint}: {type(error).__name__}: {error}") from error
    classes = list(model.dataset_meta.get("classes", ()))
    xs, ys = tile_offsets(width, height, args.patch_size, args.overlap)
    w, h = min(args.patch_size, width), min(args.patch_size, height)
    grid = [(i, j) for j in range(len(ys)) for i in range(len(xs))]  # row by row
    print(f"image {args.image}: {width}x{height}, {len(grid)} tile(s) of {w}x{h}", flush=True)

    boxes, scores, labels = [], [], []
    for n, (i, j) in enumerate(grid, 1):
        start = time.monotonic()
        x, y = xs[i], ys[j]
        tile = img[y:y + h, x:x + w].copy()  # contiguous, as cv2-based transforms expect
        pred = inference_detector(model, tile).pred_instances.cpu()
        tile_boxes = pred.bboxes + torch.tensor([x, y, x, y], dtype=pred.bboxes.dtype)
        x1, y1, x2, y2 = tile_boxes.unbind(1)
        cut = (cut_by_inner_edge(x1, x2, xs, i, args.patch_size)
               | cut_by_inner_edge(y1, y2, ys, j, args.patch_size))
        scored = pred.scores >= args.score_threshold
        keep = scored & ~cut
        boxes.append(tile_boxes[keep])
        scores.append(pred.scores[keep])
        labels.append(pred.labels[keep])
        print(f"tile {n}/{len(grid)} at ({x}, {y}): {int(keep.sum())} detection(s), "
              f"{int((scored & cut).sum())} cut by a tile edge dropped, "
              f"{time.monotonic() - start:.1f} s", flush=True)

    boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    kept = batched_nms(boxes, scores, labels, args.nms_iou)  # sorted by descending score
    detections = []
    for i in kept.tolist():
        label = int(labels[i])
        detections.append({
            "bbox": [round(float(v), 2) for v in boxes[i]],
            "score": round(float(scores[i]), 4),
            "label": label,
            "class_name": classes[label] if label < len(classes) else str(label),
        })

    result = {
        "metadata": {
            "image": str(args.image.resolve()), "width": width, "height": height,
            "patch_size": args.patch_size, "overlap": args.overlap, "tiles": len(grid),
            "score_threshold": args.score_threshold, "nms_iou": args.nms_iou,
            "config": str(args.config.resolve()), "checkpoint": str(args.checkpoint.resolve()),
            "device": args.device, "classes": classes,
        },
        "detections": detections,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / OUTPUT
    partial = out.with_suffix(".json.tmp")  # a reader never sees a half-written file
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(out)
    print(f"{len(detections)} detection(s) after NMS ({len(boxes)} before); wrote {out}",
          flush=True)


def main():
    args = parse_args()
    try:
        detect(args)
    except Exception as error:
        traceback.print_exc()
        print(f"error: detection failed: {type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Trains an MMDetection detector on a COCO export and keeps the checkpoint of the best epoch.

    python train.py --dataset DIR --work-dir DIR [--base-config CFG] [--base-checkpoint PATH]
                    [--epochs 15] [--batch-size 2] [--frozen-stages 2] [--device cpu] [--seed 0]

DIR/{train,valid,test}/annotations_coco.json give the splits (COCO file names are relative to
their split folder). The script writes a config that inherits --base-config into
WORK_DIR/generated/model_config.py, trains with mmengine's Runner (validation and a checkpoint
every epoch), keeps only epoch_<best>.pth, best = highest coco/bbox_mAP (ties: the later epoch;
no mAP at all: the last epoch), and writes WORK_DIR/result.json:

    {"config": <the resolved config the runner dumps, WORK_DIR/model_config.py>,
     "checkpoint": <WORK_DIR/epoch_<best>.pth>, "best_epoch": n,
     "metrics": {"bbox_mAP": .., "bbox_mAP_50": ..}, "classes": [names in label order]}

Objects stay at their native pixel size in training and in testing (no resizing, padding to a
multiple of 32 only), so a model trained on small crops detects the same objects in the large
tiles that detect.py feeds it. On failure (or SIGTERM) every epoch_*.pth is deleted and the script
exits non-zero with the error on stderr.
"""

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from pprint import pformat

SPLITS = ("train", "valid", "test")
GENERATED_CONFIG = Path("generated") / "model_config.py"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, required=True,
                        help="folder with train/, valid/, test/, each with annotations_coco.json")
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--base-config", default="mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py",
                        help="config to inherit: a file or mmdet::<path in mmdet's configs>")
    parser.add_argument("--base-checkpoint", type=Path,
                        help="weights to start from (load_from); default: random initialisation")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--frozen-stages", type=int, default=2,
                        help="backbone stages to freeze, where the backbone supports it")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be positive")
    return args


def select_device(device):
    """Must run before torch initialises CUDA: mmengine's Runner puts the model on CUDA whenever
    torch sees a GPU, so CPU training hides the GPUs."""
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return
    if device != "cuda" and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r} (expected cpu, cuda or cuda:N)")
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but torch sees no CUDA device")
    if ":" in device:
        torch.cuda.set_device(int(device.split(":", 1)[1]))


def dataset_classes(dataset):
    """Class names in label order. mmdet numbers labels in the order of the annotation file's
    `categories` list (not by id), so that order is the label order, and every split must list
    the same categories in the same order for the labels to agree between them."""
    names = {}
    for split in SPLITS:
        path = dataset / split / "annotations_coco.json"
        if not path.is_file():
            raise FileNotFoundError(f"missing {path}")
        with open(path) as f:
            names[split] = [c["name"] for c in json.load(f)["categories"]]
    if not names["train"]:
        raise ValueError(f"{dataset / 'train' / 'annotations_coco.json'} has no categories")
    for split in SPLITS[1:]:
        if names[split] != names["train"]:
            raise ValueError(f"categories of {split} ({names[split]}) differ from train's "
                             f"({names['train']}): every split must list the same, in one order")
    return names["train"]


def base_reference(base):
    """How the generated config names its base: mmdet::... as is, a file by absolute path."""
    return base if "::" in base else str(Path(base).resolve())


def load_base_config(base):
    from mmengine.config import Config
    # Loads the base the way the generated config will inherit it, mmdet::... included.
    return Config.fromstring(f"_base_ = {base_reference(base)!r}\n", ".py")


def rewritten(node, fix):
    """A full copy of a config tree with fix(key, value) -> (hit, new value) applied."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            hit, new = fix(key, value)
            out[key] = new if hit else rewritten(value, fix)
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(rewritten(value, fix) for value in node)
    return node


def delta(node, fix):
    """The smallest override that applies fix to a base config tree, or None if nothing changes.
    mmengine merges an inheriting config's dicts into the base's but replaces lists, so dicts
    carry only what changes and changed lists are repeated in full."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            hit, new = fix(key, value)
            if hit:
                out[key] = new
            else:
                sub = delta(value, fix)
                if sub is not None:
                    out[key] = sub
        return out or None
    if isinstance(node, (list, tuple)):
        full = rewritten(node, fix)
        return full if full != node else None
    return None


def backbone_supports_frozen_stages(backbone_type):
    import inspect
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cls = MODELS.get(backbone_type)
    return cls is not None and "frozen_stages" in inspect.signature(cls).parameters


def model_overrides(base_model, num_classes, frozen_stages):
    def fix(key, value):
        if key == "num_classes":
            return True, num_classes
        # Pretrained init_cfgs download weights, which a host without network cannot do.
        if key == "init_cfg" and isinstance(value, dict) and value.get("type") == "Pretrained":
            return True, None
        return False, None

    model = delta(base_model, fix) or {}
    backbone = model.setdefault("backbone", {})
    backbone["init_cfg"] = None
    if backbone_supports_frozen_stages(base_model["backbone"]["type"]):
        backbone["frozen_stages"] = frozen_stages
    elif frozen_stages:
        print(f"note: backbone {base_model['backbone']['type']} has no frozen_stages; "
              "training it whole", flush=True)
    # No resizing anywhere (see the pipelines), so the preprocessor pads to the largest stride.
    model.setdefault("data_preprocessor", {})["pad_size_divisor"] = 32
    return model


def dataloader(dataset, split, classes, pipeline, batch_size, train):
    return dict(
        _delete_=True,  # the base's sampler/dataset wrappers do not apply to a COCO export
        batch_size=batch_size,
        num_workers=0,  # workers only add start-up time and memory on small CPU jobs
        persistent_workers=False,
        drop_last=False,
        sampler=dict(type="DefaultSampler", shuffle=train),
        dataset=dict(
            type="CocoDataset",
            data_root=str(dataset),
            ann_file=f"{split}/annotations_coco.json",
            data_prefix=dict(img=f"{split}/"),
            metainfo=dict(classes=tuple(classes)),
            filter_cfg=dict(filter_empty_gt=train, min_size=1),
            test_mode=not train,
            pipeline=pipeline,
        ),
    )


def config_text(args, classes, base):
    """The inheriting config: every key overrides (dicts merge into) the base config's."""
    dataset = args.dataset.resolve()
    # Resize(scale_factor=1.0) keeps the native size but records the scale_factor that the
    # heads use to map boxes back; the data preprocessor pads to a multiple of 32.
    native = dict(type="Resize", scale_factor=1.0, keep_ratio=True)
    train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True),
        native,
        dict(type="RandomFlip", prob=0.5),
        dict(type="PackDetInputs"),
    ]
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        native,
        dict(type="LoadAnnotations", with_bbox=True),
        dict(type="PackDetInputs",
             meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]
    base_lr = base.optim_wrapper.optimizer.lr
    epochs = args.epochs
    overrides = dict(
        model=model_overrides(base.to_dict()["model"], len(classes), args.frozen_stages),
        train_pipeline=train_pipeline,
        test_pipeline=test_pipeline,
        train_dataloader=dataloader(dataset, "train", classes, train_pipeline,
                                    args.batch_size, train=True),
        val_dataloader=dataloader(dataset, "valid", classes, test_pipeline, 1, train=False),
        test_dataloader=dataloader(dataset, "test", classes, test_pipeline, 1, train=False),
        val_evaluator=dict(_delete_=True, type="CocoMetric", metric="bbox",
                           ann_file=str(dataset / "valid" / "annotations_coco.json")),
        test_evaluator=dict(_delete_=True, type="CocoMetric", metric="bbox",
                            ann_file=str(dataset / "test" / "annotations_coco.json")),
        train_cfg=dict(_delete_=True, type="EpochBasedTrainLoop", max_epochs=epochs,
                       val_interval=1),
        # The base's schedule is sized for its own epoch count: one warm-up epoch, then a
        # constant rate and a cosine decay over the second half, scaled to --epochs.
        param_scheduler=[
            dict(type="LinearLR", start_factor=1e-3, by_epoch=True, begin=0, end=1,
                 convert_to_iter_based=True),
            dict(type="CosineAnnealingLR", eta_min=base_lr * 0.05, by_epoch=True,
                 begin=epochs // 2, end=epochs, T_max=epochs - epochs // 2,
                 convert_to_iter_based=True),
        ],
        # EMA and pipeline-switching hooks assume the base's long schedule and augmentations.
        custom_hooks=[],
        default_hooks=dict(
            checkpoint=dict(type="CheckpointHook", interval=1, by_epoch=True, max_keep_ckpts=-1,
                            save_best=None),
            logger=dict(type="LoggerHook", interval=10),
        ),
        randomness=dict(seed=args.seed),
        load_from=str(args.base_checkpoint.resolve()) if args.base_checkpoint else None,
        resume=False,
    )
    lines = ["# Generated by hangar's train.py.",
             f"_base_ = {base_reference(args.base_config)!r}", ""]
    lines += [f"{key} = {pformat(value, width=100, sort_dicts=False)}"
              for key, value in overrides.items()]
    return "\n".join(lines) + "\n"


def checkpoints(work_dir):
    return {int(p.stem.split("_", 1)[1]): p for p in work_dir.glob("epoch_*.pth")}


def best_epoch(history, last_epoch):
    """history: [(epoch, {metric: value})]. Highest coco/bbox_mAP, the later epoch on ties;
    the last epoch when no validation produced an mAP."""
    scored = [(m["coco/bbox_mAP"], epoch) for epoch, m in history if "coco/bbox_mAP" in m]
    return max(scored)[1] if scored else last_epoch


def read_history(scalars):
    """Validation lines of mmengine's scalars.json (one JSON object per line, `step` = epoch)."""
    history = []
    if scalars.is_file():
        for line in scalars.read_text().splitlines():
            record = json.loads(line)
            if any(key.startswith("coco/") for key in record):
                history.append((record["step"], record))
    return history


def train(args, classes, config_path):
    from mmengine.config import Config
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    work_dir = args.work_dir.resolve()

    class KeepBestCheckpoint(Hook):
        """Deletes every epoch checkpoint but the best so far after each validation, by the
        rule that picks the final one, so disk use stays at about two checkpoints."""
        priority = "LOWEST"

        def __init__(self):
            self.history = []

        def after_val_epoch(self, runner, metrics=None):
            self.history.append((runner.epoch, dict(metrics or {})))
            keep = best_epoch(self.history, runner.epoch)
            for epoch, path in checkpoints(work_dir).items():
                if epoch != keep:
                    path.unlink()

    cfg = Config.fromfile(str(config_path))
    cfg.work_dir = str(work_dir)
    runner = Runner.from_cfg(cfg)
    runner.register_hook(KeepBestCheckpoint())
    runner.train()

    history = read_history(Path(runner.log_dir) / "vis_data" / "scalars.json")
    best = best_epoch(history, runner.epoch)
    available = checkpoints(work_dir)
    if best not in available:
        raise RuntimeError(f"epoch_{best}.pth is missing from {work_dir}")
    for epoch, path in available.items():
        if epoch != best:
            path.unlink()
    metrics = dict(history).get(best, {})
    resolved = work_dir / config_path.name  # where the runner dumps the resolved config
    result = {
        "config": str(resolved),
        "checkpoint": str(available[best]),
        "best_epoch": best,
        "metrics": {name: metrics.get(f"coco/{name}") for name in ("bbox_mAP", "bbox_mAP_50")},
        "classes": list(classes),
    }
    (work_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"best epoch {best}: bbox_mAP {result['metrics']['bbox_mAP']}, "
          f"bbox_mAP_50 {result['metrics']['bbox_mAP_50']}; wrote {work_dir / 'result.json'}",
          flush=True)


class Terminated(BaseException):
    """SIGTERM (a host cancelling the job), raised so that the cleanup below runs."""


def on_sigterm(signum, frame):
    raise Terminated()


def main():
    args = parse_args()
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        select_device(args.device)
        if args.base_checkpoint and not args.base_checkpoint.is_file():
            raise FileNotFoundError(f"base checkpoint {args.base_checkpoint} not found")
        classes = dataset_classes(args.dataset)
        config_path = args.work_dir.resolve() / GENERATED_CONFIG
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(config_text(args, classes, load_base_config(args.base_config)))
        print(f"classes: {classes}; config: {config_path}", flush=True)
        train(args, classes, config_path)
    except BaseException as error:
        for path in checkpoints(args.work_dir.resolve()).values():
            path.unlink()
        if isinstance(error, Terminated):
            print("error: training stopped by SIGTERM; checkpoints deleted", file=sys.stderr)
            sys.exit(143)
        traceback.print_exc()
        print(f"error: training failed: {type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(130 if isinstance(error, KeyboardInterrupt) else 1)


if __name__ == "__main__":
    main()

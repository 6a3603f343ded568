"""hangar's MMDetection drivers.

Each module is a stand-alone script, run by path with the MMDetection venv's interpreter:

    make_synthetic_coco.py  a synthetic two-class COCO data set, or a large image to detect in
    train.py                fine-tunes (or trains from scratch) a detector on a COCO export
    detect.py               tiled ("sliced") inference over one image
"""

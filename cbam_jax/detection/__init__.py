"""A single-stage detector (FCOS) on any registry backbone: boxes, points, assignment, losses, FPN,
head, decoding with batched NMS, a generated offline data set, COCO-style evaluation and training.

Every array function here is jit-compatible with static shapes: ground truth is padded to a fixed
number of boxes per image with a mask, and decoding returns a fixed number of detections per image
with a mask. Boxes are (x0, y0, x1, y1) in pixels of the network input.
"""

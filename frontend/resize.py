"""How big to decode and how to resize: shared by the workers and the benchmark's ceiling, so the
ceiling does what ringserve does (this module imports only OpenCV)."""

from __future__ import annotations

import cv2

# From this shrink factor on, a resize averages areas (INTER_AREA); below it, it is bilinear. A
# bilinear filter is two input pixels wide, so under 2x every input pixel still counts and nothing
# aliases; TensorFlow's object-detection API, which trained the default SSD, resizes bilinearly
# too (no antialias). And it is cheaper: OpenCV 5's INTER_AREA at a factor that is not a whole
# number, for a 640x480 photo on one thread of this 2-core EPYC: the SSD's 400x300 decode to
# 300x300, 0.70 ms (bilinear 0.24); Lite0's 262x262 window to 224x224, 0.48 ms (bilinear 0.08),
# against 1.6 ms for the decode itself. The DCT-domain decode leaves a JPEG's tighter side only a
# little larger than needed (libjpeg-turbo scales by n/8), so bilinear is the common case; PNGs,
# and a wide photo stretched to a square model (its long side), keep the area filter.
AREA_FROM = 2.0


def interpolation(src_w: int, src_h: int, dst_w: int, dst_h: int) -> int:
    """OpenCV's filter for resizing src to dst pixels: the larger of the two shrink factors decides."""
    return cv2.INTER_AREA if max(src_w / dst_w, src_h / dst_h) >= AREA_FROM else cv2.INTER_LINEAR


def decode_size(width: int, height: int, resize: str, resize_short: int) -> tuple[int, int]:
    """The smallest decoded (width, height) worth decoding for a model input of width x height.

    A center-crop's window is the middle ``width / resize_short`` of the short side, so the short
    side must decode to resize_short or more; decoded only to the model's size, a 640x480 photo's
    224x224 window came from 210 decoded pixels, enlarged.
    """
    if resize == "center-crop":
        short = resize_short or max(width, height)
        return max(width, short), max(height, short)
    return width, height

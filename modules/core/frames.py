"""FRAME256: the original image stretched to 256 x 256, the frame of cached logits and prompt maps.

SAM's low-resolution mask output is 256 x 256 of the padded, resized input; the pipeline resamples
it onto the whole original image stretched to that size, so every cached array has one shape
whatever the image's aspect ratio.
"""

FRAME256 = 256

"""How one image of a batch is laid out for a tiling tower: the VIEW_* flags in the third column of a batch's
`image_sizes` [M, 3] (height, width, flags). The data sets them (datamodules/image_tokens.py), a tiling packs by
them (encoders/anyres/anyres.py); 0, or no third column, is a single image tiled as LLaVA-NeXT tiles it.

From LLaVA-OneVision as transformers implements it (`LlavaOnevisionModel.get_image_features` with
`batch_num_images`, `get_video_features`, `apply_pooling`): an image of a sample with several images is its base
view alone followed by one newline; a video frame is its base view pooled 2x2, one newline after the video's
last frame. A plain tower (one view, `num_tokens` each) reads none of them.
"""

VIEW_BASE_ONLY = 1  # the base view alone: no tiles
VIEW_POOL = 2  # the base view's [gh, gw] map resized bilinearly to [ceil(gh / 2), ceil(gw / 2)]
VIEW_NEWLINE = 4  # one learned newline after the (base-only) view

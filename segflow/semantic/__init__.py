"""Semantic segmentation (one class per pixel): model factory, FCN/SegNet, card and store, dataset,
Lightning module, losses, metrics, inference, pictures."""

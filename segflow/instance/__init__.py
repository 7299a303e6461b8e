"""Instance segmentation (Mask R-CNN): the task family beside segflow.semantic."""

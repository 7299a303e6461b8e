"""Data sources and their checks: synthetic scenes, folders, archives, CamVid/ISBI layouts; decoding, splits, the report."""

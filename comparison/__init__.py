"""The compare command's parts (``compare.py`` at the pack root is the entry point): method rows applied
through the pack's nodes, the runs behind each grid cell, the grid picture and the metrics reports."""

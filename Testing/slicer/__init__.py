"""Tests of the Slicer module (UMLSegmentation) under slicer-core."""

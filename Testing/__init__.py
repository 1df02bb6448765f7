"""Tests of UML for 3D Slicer: one package per part (umlcore, training, slicer), one test file per module."""

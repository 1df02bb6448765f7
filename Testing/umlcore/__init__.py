"""Tests of the umlcore engine."""

"""Datasets: paddleseg's dataset types behind one checked, deterministic sample reader
(segslim.builder.build_dataset builds them from a config)."""
from segslim.data.datasets import SegDataset

__all__ = ['SegDataset']

"""Datasets: paddleseg's dataset types behind one checked, deterministic sample reader."""
from segslim.data.datasets import SegDataset, build_dataset

__all__ = ['SegDataset', 'build_dataset']

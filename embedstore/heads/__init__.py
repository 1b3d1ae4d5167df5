"""Classifier heads over cached vectors: the estimators, the comparison protocol, and saved heads with lineage."""
from __future__ import annotations

from .knn import FaissKNNClassifier
from .confusion import write_confusion_png
from .compare import classify, fit_head, ClassifyReport, FittedHead, best_result, carve_validation, parse_models, score_predictions, DEFAULT_MODELS, MODELS
from .saved import Head, load_head, save_head, predict_images

__all__ = ['FaissKNNClassifier', 'write_confusion_png', 'classify', 'fit_head', 'ClassifyReport', 'FittedHead', 'best_result', 'carve_validation', 'parse_models', 'score_predictions', 'DEFAULT_MODELS', 'MODELS', 'Head', 'load_head', 'save_head', 'predict_images']

"""Classifier heads over cached vectors: the estimators (zero-shot included), the comparison protocol, and saved
heads with lineage.

Crash safety: heads are fitted in memory; a saved head's payload and manifest are each written
atomically, manifest last (:mod:`.saved`), so a crash leaves the previous head or none.
"""
from __future__ import annotations

from .knn import FaissKNNClassifier
from .zeroshot import ZeroShotClassifier, class_prompts, text_class_embeddings
from .confusion import write_confusion_png
from .protocol import fit_head, FittedHead, best_result, carve_validation, model_names, parse_models, score_predictions, DEFAULT_MODELS, MODELS
from .compare import classify, ClassifyReport
from .saved import Head, load_head, save_head, predict_images
from .predict_store import predict_store, write_predictions

__all__ = ['FaissKNNClassifier', 'ZeroShotClassifier', 'class_prompts', 'text_class_embeddings', 'write_confusion_png', 'classify', 'fit_head', 'ClassifyReport', 'FittedHead', 'best_result', 'carve_validation', 'model_names', 'parse_models', 'score_predictions', 'DEFAULT_MODELS', 'MODELS', 'Head', 'load_head', 'save_head', 'predict_images', 'predict_store', 'write_predictions']

"""One builder per :class:`~basin_volume.config.ModelType`: the objective and centre of a run."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from .basins import Basin, causal_objective, classifier_objective
from .basins import fisher_inputs as _fisher_inputs
from .config import ModelType, VolumeConfig
from .devices import default_device
from .parameters import (
    preserved,
)
from .volume_estimator import VolumeEstimator


def _classifier(config: VolumeConfig) -> VolumeEstimator:
    if not isinstance(config.model, torch.nn.Module):
        raise ValueError(
            "model must be a torch.nn.Module mapping inputs to logits for "
            f"model_type={config.model_type.value!r}, got {type(config.model).__name__}"
        )
    if config.inputs is None:
        raise ValueError(
            f"inputs is required for model_type={config.model_type.value!r}: pass inputs=<tensor>"
            " or a DataLoader"
        )
    with preserved(config.model):
        fn = classifier_objective(config)
    ref = getattr(fn, "ref_logp", None)  # the KL basin's cached centre
    n_classes = ref[0].shape[-1] if ref else 0
    if ref and isinstance(config.cutoff, int | float) and config.cutoff >= math.log(n_classes):
        warnings.warn(
            f"cutoff={config.cutoff:g} nats is at least log({n_classes}) = "
            f"{math.log(n_classes):.3g}, the KL from the centre to a constant uniform "
            "predictor: such a basin contains networks that have forgotten everything; typical "
            "cutoffs are 1e-3 to 1e-1",
            UserWarning,
            stacklevel=3,
        )
    return VolumeEstimator(config, config.model, fn, fisher_inputs=_fisher_inputs(config, fn))


def _convnext(config: VolumeConfig) -> VolumeEstimator:
    model = config.model
    if model is None and config.model_name is None:
        raise ValueError(
            "model_type='convnext' needs model= (an image classifier) or model_name= (a local "
            "folder or hub id, e.g. 'facebook/convnextv2-atto-1k-224')"
        )
    if config.inputs is None:
        raise ValueError(
            "inputs is required for model_type='convnext': pass the preprocessed pixel values "
            "[n, channels, height, width] (e.g. from the model's AutoImageProcessor)"
        )
    if model is None:
        try:
            from transformers import AutoModelForImageClassification
        except ImportError as err:
            raise ImportError(
                "model_name needs transformers: pip install 'basin_volume[hf]'"
            ) from err
        model = AutoModelForImageClassification.from_pretrained(config.model_name)
        model.to(default_device())
    elif config.model_name is not None:
        raise ValueError("pass model or model_name for model_type='convnext', not both")
    return _classifier(config.replace(model=model))


def _mlp(config: VolumeConfig) -> VolumeEstimator:
    from .digits import train_digits_mlp

    model, inputs, optimizer = config.model, config.inputs, config.optimizer
    labels = config.labels
    if model is None or inputs is None:
        run = train_digits_mlp(seed=config.seed)
        if model is None:  # the optimizer that trained it comes along
            model, optimizer = run.model, run.optimizer if optimizer is None else optimizer
        if inputs is None and config.basin is Basin.LOSS and labels is None:
            labels = run.train_labels  # the loss basin of the training digits
        inputs = run.train_inputs if inputs is None else inputs
    return _classifier(
        config.replace(model=model, inputs=inputs, optimizer=optimizer, labels=labels)
    )


def _causal(config: VolumeConfig) -> VolumeEstimator:
    if config.model is None:
        raise ValueError(
            "model is required for model_type='causal': pass a Hugging Face causal LM, e.g. "
            "AutoModelForCausalLM.from_pretrained(name), or use model_type='pythia'"
        )
    if config.tokenizer is None and config.inputs is None:
        raise ValueError(
            "tokenizer is required for model_type='causal': pass the model's tokenizer, e.g. "
            "AutoTokenizer.from_pretrained(name)"
        )
    if config.dataset is None and config.inputs is None:
        raise ValueError(
            f"dataset is required for model_type={config.model_type.value!r}: pass texts, e.g. "
            "datasets.Dataset.from_dict({'text': [...]}), with text_key naming the column (or "
            "inputs=<token batches with input_ids and attention_mask>)"
        )
    mbs = config.model_batch_size
    if isinstance(mbs, bool) or not isinstance(mbs, int) or mbs < 1:
        raise ValueError(f"model_batch_size must be a positive integer, got {mbs!r}")
    fn = causal_objective(config)
    return VolumeEstimator(config, fn.model, fn, fisher_inputs=fn)


def _pythia(config: VolumeConfig) -> VolumeEstimator:
    from .causal import load_pythia

    if config.model is not None or config.tokenizer is not None:
        raise ValueError(
            "model_type='pythia' loads the model and tokenizer itself from model_name and "
            "checkpoint_step; leave model and tokenizer unset, or use model_type='causal' "
            "to pass your own"
        )
    if config.dataset is None and config.inputs is None:  # checked before a download
        raise ValueError(
            "dataset is required for model_type='pythia': pass validation texts, e.g. "
            "datasets.Dataset.from_dict({'text': [...]}), with text_key naming the column"
        )
    model, tokenizer = load_pythia(config.model_name, config.checkpoint_step)
    return _causal(config.replace(model=model, tokenizer=tokenizer))


BUILDERS: dict[ModelType, Callable[[VolumeConfig], VolumeEstimator]] = {
    ModelType.CLASSIFIER: _classifier,
    ModelType.MLP: _mlp,
    ModelType.CAUSAL: _causal,
    ModelType.PYTHIA: _pythia,
    ModelType.CONVNEXT: _convnext,
}

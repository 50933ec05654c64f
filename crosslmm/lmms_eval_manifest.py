"""The `lmms_eval.models` entry point (`crosslmm = crosslmm.lmms_eval_manifest:manifest` in setup.cfg): what
`--model crosslmm` names, without importing the model code.

A module of its own because lmms-eval builds its model registry, loading every entry point, while its own modules are
being imported (importing `lmms_eval.protocol` first does it): an entry point inside `crosslmm.evaluation`, which
imports lmms-eval, would then be loaded half imported, or import a half-imported lmms-eval module.
"""

MODEL_ID = "crosslmm"


def manifest():
    """`--model crosslmm`: chat protocol by default, simple with `--force_simple` (classes in
    `crosslmm.evaluation`, imported when lmms-eval builds the model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_ID,
        simple_class_path="crosslmm.evaluation.CrossLMMSimple",
        chat_class_path="crosslmm.evaluation.CrossLMMChat",
    )

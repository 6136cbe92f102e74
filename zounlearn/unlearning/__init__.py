"""The unlearning loop's building blocks.

data.py, synthetic.py: one representation for every source (`Example`, `Split`,
`UnlearningData`), loaders for the user's files, Hugging Face data sets and the TOFU, MUSE
and WMDP schemas, and a synthetic data set of fictitious people. batches.py: examples to
model inputs (loss on answer tokens only). objectives.py: GA, GradDiff, NPO, SimNPO, RMU.
evaluation.py: our metrics and the field's (TOFU's truth ratio, forget quality and model
utility, MUSE's PrivLeak, ...), against a retain model; metrics.py: the registry of their keys.
perturbed.py: a question with the paraphrased and perturbed answers TOFU's truth ratio scores.
"""

from .batches import Batch, Batches, answer_log_likelihoods, join, token_log_probs, tokenize_examples
from .data import DataError, Example, Split, UnlearningData, load_examples, load_muse, load_tofu, load_wmdp
from .evaluation import RetainReference, evaluate, register_retain_model
from .metrics import METRICS, Metric
from .objectives import GA, NPO, OBJECTIVES, RMU, GradDiff, Objective, SimNPO, make_objective, transformer_blocks
from .perturbed import PerturbedQA
from .synthetic import Person, SyntheticPeople, synthetic_data, synthetic_people

__all__ = [
    "Batch", "Batches", "DataError", "Example", "GA", "GradDiff", "METRICS", "Metric", "NPO", "OBJECTIVES", "Objective",
    "Person", "PerturbedQA", "RMU", "RetainReference", "SimNPO", "Split", "SyntheticPeople", "UnlearningData",
    "answer_log_likelihoods", "evaluate", "join", "load_examples", "load_muse", "load_tofu", "load_wmdp",
    "make_objective", "register_retain_model", "synthetic_data", "synthetic_people", "token_log_probs",
    "tokenize_examples", "transformer_blocks",
]

# Models: any Hugging Face causal LM, and the embedded default (a small GPT-2 trained on the synthetic people).
from .model import (  # noqa: E402
    EmbeddedConfig,
    ModelError,
    embedded_model,
    embedded_model_dir,
    load_model,
    retrain_model,
    retrain_model_dir,
)
from .tokenizer import build_tokenizer  # noqa: E402

__all__ += ["EmbeddedConfig", "ModelError", "build_tokenizer", "embedded_model", "embedded_model_dir", "load_model",
            "retrain_model", "retrain_model_dir"]

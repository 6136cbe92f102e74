"""The unlearning loop's building blocks. Data: one representation for every source
(`Example`, `Split`, `UnlearningData`), loaders for the user's files, Hugging Face data
sets and the TOFU, MUSE and WMDP schemas, and a synthetic data set of fictitious people.
"""

from .data import (DataError, Example, Split, UnlearningData, load_examples, load_muse, load_tofu,
                   load_wmdp)
from .synthetic import Person, SyntheticPeople, synthetic_data, synthetic_people

__all__ = ["DataError", "Example", "Person", "Split", "SyntheticPeople", "UnlearningData", "load_examples",
           "load_muse", "load_tofu", "load_wmdp", "synthetic_data", "synthetic_people"]

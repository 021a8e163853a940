import os

import numpy as np
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)  # pytest runs one worker per core (-n 2); more threads per worker only contend


@pytest.fixture(scope="session")
def cancer():
    """Breast cancer data as a DataFrame and a fitted, scaled logistic regression."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer(as_frame=True)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(data.data, data.target)
    return data.data, data.target, model


@pytest.fixture
def rng():
    return np.random.default_rng(0)

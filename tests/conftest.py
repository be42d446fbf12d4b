import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: the models here are tiny, and on a loaded 2-core machine two threads make their
# small matrix products many times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_run():
    from basin_volume.digits import train_digits_mlp

    return train_digits_mlp(steps=300, seed=0)

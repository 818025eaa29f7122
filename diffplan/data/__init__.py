"""Offline datasets: `OfflineDataset`, Minari / D4RL HDF5 / npz I/O, `load`, windows, normalizers."""

from diffplan.data.d4rl import from_d4rl_hdf5, to_d4rl_hdf5
from diffplan.data.dataset import DatasetError, OfflineDataset
from diffplan.data.load import load
from diffplan.data.minari_io import (
    datasets_root,
    delete_minari_dataset,
    from_minari,
    local_minari_datasets,
    minari_dataset_exists,
    minari_dataset_health,
    recover_minari_datasets,
    remake_command,
    to_minari,
)
from diffplan.data.normalizers import (
    GaussianNormalizer,
    LimitsNormalizer,
    Normalizer,
    make_normalizer,
)
from diffplan.data.npz import from_npz, to_npz
from diffplan.data.windows import SequenceWindows, discounted_returns

__all__ = [
    "DatasetError",
    "GaussianNormalizer",
    "LimitsNormalizer",
    "Normalizer",
    "OfflineDataset",
    "SequenceWindows",
    "datasets_root",
    "delete_minari_dataset",
    "discounted_returns",
    "from_d4rl_hdf5",
    "from_minari",
    "from_npz",
    "load",
    "make_normalizer",
    "local_minari_datasets",
    "minari_dataset_exists",
    "minari_dataset_health",
    "recover_minari_datasets",
    "remake_command",
    "to_d4rl_hdf5",
    "to_minari",
    "to_npz",
]

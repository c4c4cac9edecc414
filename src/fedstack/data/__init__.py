"""Datasets and partitioners for experiments and simulations.

Nothing here downloads anything: scikit-learn's bundled digits (:mod:`fedstack.data.digits`),
FedProx's Synthetic(alpha, beta) generator (:mod:`fedstack.data.synthetic`), CIFAR-10/100
from a local folder in either distribution format (:mod:`fedstack.data.cifar`; the pickled
"python version" is parsed without unpickling, :mod:`fedstack.data.inert_pickle`), and the
partitioners IID, Dirichlet label skew, k-classes-per-agent shards and quantity skew
(:mod:`fedstack.data.partition`).
"""

from fedstack.data.digits import load_digits_split, partition_digits
from fedstack.data.partition import Partitioner, dirichlet, iid, parse_partition

__all__ = [
    "Partitioner",
    "dirichlet",
    "iid",
    "load_digits_split",
    "parse_partition",
    "partition_digits",
]

"""Initialization methods, one module each (pissa, milora, mica, olora, corda, eva, lora-ga, extract), registered by name."""

from .base import FULL_SVD, QR, RANDOMIZED_SVD, Method
from .registry import METHODS, get_method, method_names, register

# Importing a method's module registers it.
from . import corda, eva, extract, lora_ga, mica, milora, olora, pissa  # noqa: E402,F401

__all__ = ["FULL_SVD", "METHODS", "Method", "QR", "RANDOMIZED_SVD", "get_method", "method_names", "register"]

"""Experiment tracking: the local metrics file and plots, comet, TensorBoard, and the factory
choosing them."""

from salt.tracking.base import Logger, MultiLogger, NullLogger
from salt.tracking.factory import LoggerConfigError, build_logger

__all__ = ["Logger", "LoggerConfigError", "MultiLogger", "NullLogger", "build_logger"]

"""Iteration-level scheduling: which requests run each step, and how many tokens each.

Pure Python: this package never imports torch, the runner or the kernels.
"""

from loramux.scheduler.config import SchedulerConfig, SchedulerConfigError
from loramux.scheduler.kv_cache_manager import KVCacheManager
from loramux.scheduler.output import ModelRunnerOutput, RequestDelta, SchedulerOutput, TokenLogprobs
from loramux.scheduler.request import BASE_SLOT, FinishReason, Request, RequestStatus
from loramux.scheduler.residency import AdapterResidency
from loramux.scheduler.sampling_params import InvalidSamplingParams, SamplingParams
from loramux.scheduler.scheduler import DuplicateRequestId, PromptTooLong, Scheduler

__all__ = [
    "BASE_SLOT",
    "AdapterResidency",
    "DuplicateRequestId",
    "FinishReason",
    "InvalidSamplingParams",
    "KVCacheManager",
    "ModelRunnerOutput",
    "PromptTooLong",
    "Request",
    "RequestDelta",
    "RequestStatus",
    "SamplingParams",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerConfigError",
    "SchedulerOutput",
    "TokenLogprobs",
]

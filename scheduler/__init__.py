"""Iteration-level scheduling: which requests run each step, and how many tokens each.

Pure Python: this package never imports torch, the runner or the kernels.
"""

from scheduler.config import SchedulerConfig, SchedulerConfigError
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.output import ModelRunnerOutput, RequestDelta, SchedulerOutput, TokenLogprobs
from scheduler.request import BASE_SLOT, FinishReason, Request, RequestStatus
from scheduler.residency import AdapterResidency
from scheduler.sampling_params import InvalidSamplingParams, SamplingParams
from scheduler.scheduler import DuplicateRequestId, PromptTooLong, Scheduler

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

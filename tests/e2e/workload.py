"""The LLMDeployment that the closed-loop test and bench/autoscale_step.py both drive."""

from __future__ import annotations

from typing import Any

TARGET_QUEUE_DEPTH = 2


def closed_loop_spec(*, evaluation_period_s: float, scale_down_window_s: float) -> dict[str, Any]:
    """SmolLM2 on the CPU, 1..2 replicas, scaled on queue depth.

    Two sequences at a time, so a handful of concurrent requests is a queue; a KV cache (64 MB: ~170 blocks) large
    enough that the queue, not KV usage, is what drives the decision.
    """
    return {
        "model": {"source": "builtin:smollm2-135m-instruct", "maxModelLen": 512},
        "replicas": 1,
        "resources": {"gpus": 0},
        "engine": {
            "maxNumSeqs": 2,
            "maxNumBatchedTokens": 256,
            "extraArgs": ["--device", "cpu", "--kv-cache-memory", str(64 * 1024 * 1024)],
        },
        "autoscaling": {
            "enabled": True,
            "minReplicas": 1,
            "maxReplicas": 2,
            "targetQueueDepth": TARGET_QUEUE_DEPTH,
            "evaluationPeriodSeconds": evaluation_period_s,
            "scaleUpStabilizationSeconds": 0,
            "scaleDownStabilizationSeconds": scale_down_window_s,
        },
    }


TARGET_KV_UTILIZATION = 0.3


def kv_loop_spec(*, evaluation_period_s: float) -> dict[str, Any]:
    """The same runtime scaled on KV-cache utilization instead: a small cache (16 MB: ~22 blocks of 16 tokens in
    float32) that four long generations fill past 30%, and a queue target so high that the queue never decides."""
    spec = closed_loop_spec(evaluation_period_s=evaluation_period_s, scale_down_window_s=300)
    spec["engine"] = {
        "maxNumSeqs": 4,
        "maxNumBatchedTokens": 256,
        "extraArgs": ["--device", "cpu", "--kv-cache-memory", str(16 * 1024 * 1024)],
    }
    spec["autoscaling"] |= {"targetQueueDepth": 1000, "targetKVCacheUtilization": TARGET_KV_UTILIZATION}
    return spec

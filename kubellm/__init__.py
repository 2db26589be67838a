"""kubellm: run large language models on Kubernetes.

`kubellm.runtime` (folder `runtime/`) is the inference server; `kubellm.operator` (folder `operator/`)
is the operator that runs it.
"""

__version__ = "0.1.0"

"""End-to-end: the operator, the test control plane and real runtime processes in one closed loop.

A package (imported as `e2e`, tests/ is on sys.path) so that bench/autoscale_step.py can reuse the harness:
kubelet.py (starts a runtime per pod), load.py (streaming clients), operator_process.py (`kubellm operator`),
observer.py (a timeline of the LLMDeployment and its Deployment).
"""

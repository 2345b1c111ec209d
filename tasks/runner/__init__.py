"""mpc.runner: the code inside the task-runner image.

The provisioning, deprovisioning, error-secret and sweep Tasks run its
entry point (``mpc-runner``). ``contract`` holds the names every part of mpc
agrees on (labels, finalizer, PipelineRun and secret names, user names).
"""

"""mpc.generator: the ``mpc`` CLI and everything that emits Tekton YAML.

It generates the provisioning Tasks and Pipelines into ``tasks/``, turns a
``buildah`` Task into ``buildah-remote``, validates host pools and drives
bundle publishing. Each subcommand lives in its own ``cmd_*`` module.
"""

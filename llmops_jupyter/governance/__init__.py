"""Governance and ecosystem: model cards, the audit log, ``doctor``, MLflow/bundle export and resource sampling.

Everything here reads the registry generically (runs, params, metrics, artifacts, edges), because the stages that
write those records are developed independently: a missing record makes a card say "not recorded", never crash.

The audit, resource-sampling and automatic-card listeners are in every Runner's default set
(:data:`llmops_jupyter.core.runner.DEFAULT_LISTENERS`), so every run in every process (kernel, CLI, detached worker,
sweep worker, Lab server) is audited, resource-sampled and carded without any change to the stages. The listener
modules use only the standard library and light ``llmops_jupyter`` modules at top level.
"""

"""Using a trained adapter: ``load`` (a suite's trial, a trial folder or an export) -> ``Model`` with
``predict`` and ``generate``; ``export`` to what peft and transformers load; the CLI's predict/export."""

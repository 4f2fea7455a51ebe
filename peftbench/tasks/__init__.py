"""Tasks: the ``Task`` contract (``task``), where data comes from (``sources``), naming a task
(``resolve``, ``entry``), tokenized splits for training (``data``) and metrics (``metrics``)."""

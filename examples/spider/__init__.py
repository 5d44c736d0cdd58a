"""The Spider text-to-SQL example: a LangGraph SQL agent trained with lightning.

``agent.py`` (the rollout and ``dataset()``), ``sql.py`` (extraction, the read-only guarded
executor, the execution-match reward), ``data.py`` (the public Spider loader and the
bundled set), ``make_data.py`` (the bundled set's generator), ``base_rate.py`` (held-out
accuracy of an untrained policy). See README.md.
"""

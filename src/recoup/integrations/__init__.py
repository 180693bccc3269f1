"""Adapters that let other tools drive recoup models.

:mod:`recoup.integrations.lm_eval` registers the lm-evaluation-harness model ``recoup`` on import
(needs the optional extra ``recoup[lm-eval]``).
"""

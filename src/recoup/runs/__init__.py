"""Runs: recipes executed stage by stage with caching and resume, a SQLite results store, reports.

``run_recipe(recipe, out, store)`` (:mod:`recoup.runs.run`), ``Store`` (:mod:`recoup.runs.store`),
``write_report`` (:mod:`recoup.runs.report`), executors (:mod:`recoup.runs.executor`).
"""

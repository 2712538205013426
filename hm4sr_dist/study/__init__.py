"""Studies in one command (paper Table 1, Figs. 3-5): `plan` (settings x seeds, checked and keyed by
run identity; no Ray), `runner` (one Ray Tune trial = one Ray Train run, resumable), `report`
(CSV/Markdown tables with paired-bootstrap CIs, matplotlib figures). Entry point: jobs/study.py."""

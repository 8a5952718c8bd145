"""Study and cluster: what runs many trainings and checks the machines they run on.

Owns the study's store and its leases (``store``, ``leases``), its report and Pareto front
(``report``, ``pareto``), the cluster's resources (``cluster``) and the fault table with its
probe jobs (``faults``, ``probe``).

Imports: any other part of ``vitok.platform``; nothing in ``vitok.platform`` imports it.
"""

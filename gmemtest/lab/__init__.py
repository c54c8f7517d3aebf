"""The lab host in a box: an L1 KVM host under TCG where memory failure and guest_memfd are real.

``host`` boots L1 and runs a command in it; ``qualify`` runs the host checks and the chain
inside it and reads the verdicts back; ``batch`` runs the host-side pytest files inside it;
``snapshot`` is the trial of saving and restoring L1.
"""

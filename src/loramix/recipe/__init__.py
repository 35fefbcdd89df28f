"""`loramix build`: the whole pipeline (experts, gate, evaluation, report) from one recipe file."""

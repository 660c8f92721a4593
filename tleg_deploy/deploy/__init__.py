"""Composers: the deploy job (`fit`) and artifact inspection, built from the verbs below."""

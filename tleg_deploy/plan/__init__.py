"""The torch-free planning layer: analytic costs, budgets, the depth solver, units."""

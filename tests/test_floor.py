"""The floor of a grid: distinct dense products, counted by hand on small grids."""

from featcache.grid import expand_grid, floor_products


def test_floor_of_a_hand_counted_grid():
    grid = {
        "ash_p": {"p": [60, 90]},           # 2 pruned features: p 60, p 90
        "ash_s": {"p": [90, 95]},           # p 90 shares ash_p's product; p 95 is new: 3
        "ash_b": {"p": [90]},               # a 0/1 mask at 90: 4
        "react": {"percentile": [90, 95], "clip": None},  # two clips: 6
        "react+ash_s": {"clip": [1.0], "p": [90]},        # clipped at 1.0 then pruned: 7
        "react+ash_p": {"clip": [1.0], "p": [90]},        # the same product as react+ash_s: 7
        "dice": {"p": [70]},                # its own head: 8
        "nap+ash_s": {"p": [60], "w": [0.2, 0.8]},        # ash_p at 60 already has it: 8
        "nap+dice": {"p": [90], "w": [0.5]},              # dice at 90 is new: 9
        "scale": {"p": [50, 85]},           # none
        "energy": {"T": [1, 2, 5]},         # none
        "rg": {"k": [0.5, 1.0]}, "rg_add": {"k": [1.0]}, "nap+energy": {"w": [0.3]},
        "msp": {}, "maxlogit": {}, "gradnorm": {}, "nap": {},
    }
    assert floor_products(expand_grid(grid)) == 9


def test_floor_counts_names_too_and_no_product_grids():
    assert floor_products([("energy", {"T": 1.0}), ("scale", {"p": 85}), ("nap+msp", {"w": 0.5, "eps": 1.0})]) == 0
    assert floor_products([("ash_s", {"p": 90}), ("ash_p", {"p": 90}), ("ash_b", {"p": 90})]) == 2
    # a clip given and a percentile are different specs even if equal on some cache
    assert floor_products([("react", {"clip": 1.0}), ("react", {"percentile": 90, "percentile_of": "id_train"}),
                           ("react", {"percentile": 90, "percentile_of": "id_val"})]) == 3

"""The small, fixed world the executable tools (tools.py) answer from, split into train and held-out halves.

Geography (capitals, coordinates to 2 decimals, standard-time UTC offsets without DST), element data and the
landmark facts are real. Weather, exchange rates and shop prices are invented and fixed, and the tool descriptions say
so. Every value a held-out conversation can put into a tool argument comes from the held-out half (or from a numeric
range that training never uses; see scenarios.py), which is what makes the held-out split unseen.
"""

from __future__ import annotations

from typing import NamedTuple


class City(NamedTuple):
    name: str
    country: str
    utc_offset: float  # hours, standard time
    lat: float
    lon: float


TRAIN_CITIES = [
    City("Oslo", "Norway", 1, 59.91, 10.75),
    City("Paris", "France", 1, 48.86, 2.35),
    City("Berlin", "Germany", 1, 52.52, 13.40),
    City("Madrid", "Spain", 1, 40.42, -3.70),
    City("Rome", "Italy", 1, 41.90, 12.50),
    City("London", "United Kingdom", 0, 51.51, -0.13),
    City("Tokyo", "Japan", 9, 35.68, 139.69),
    City("Beijing", "China", 8, 39.90, 116.40),
    City("Mumbai", "India", 5.5, 19.08, 72.88),
    City("Sydney", "Australia", 10, -33.87, 151.21),
    City("New York", "United States", -5, 40.71, -74.01),
    City("Chicago", "United States", -6, 41.88, -87.63),
    City("Toronto", "Canada", -5, 43.65, -79.38),
    City("Cairo", "Egypt", 2, 30.04, 31.24),
    City("Nairobi", "Kenya", 3, -1.29, 36.82),
    City("Moscow", "Russia", 3, 55.76, 37.62),
    City("Seoul", "South Korea", 9, 37.57, 126.98),
    City("Mexico City", "Mexico", -6, 19.43, -99.13),
    City("Buenos Aires", "Argentina", -3, -34.60, -58.38),
    City("Bangkok", "Thailand", 7, 13.76, 100.50),
]
HELDOUT_CITIES = [
    City("Lisbon", "Portugal", 0, 38.72, -9.14),
    City("Vienna", "Austria", 1, 48.21, 16.37),
    City("Helsinki", "Finland", 2, 60.17, 24.94),
    City("Athens", "Greece", 2, 37.98, 23.73),
    City("Istanbul", "Turkey", 3, 41.01, 28.98),
    City("Dubai", "United Arab Emirates", 4, 25.20, 55.27),
    City("Singapore", "Singapore", 8, 1.35, 103.82),
    City("Jakarta", "Indonesia", 7, -6.21, 106.85),
    City("Lima", "Peru", -5, -12.05, -77.04),
    City("Santiago", "Chile", -4, -33.45, -70.67),
    City("Reykjavik", "Iceland", 0, 64.15, -21.94),
    City("Auckland", "New Zealand", 12, -36.85, 174.76),
    City("Lagos", "Nigeria", 1, 6.52, 3.38),
    City("Vancouver", "Canada", -8, 49.28, -123.12),
]
CITIES = {c.name.lower(): c for c in TRAIN_CITIES + HELDOUT_CITIES}

# country -> capital, for plain-chat facts (train: the train cities that are capitals)
TRAIN_CAPITALS = {c.country: c.name for c in TRAIN_CITIES
                  if c.country not in ("United States", "Canada", "Australia", "India")}
HELDOUT_CAPITALS = {"Portugal": "Lisbon", "Austria": "Vienna", "Finland": "Helsinki", "Greece": "Athens",
                    "Peru": "Lima", "Chile": "Santiago", "Iceland": "Reykjavik", "Indonesia": "Jakarta",
                    "Hungary": "Budapest", "Poland": "Warsaw", "Vietnam": "Hanoi", "Ireland": "Dublin"}

# invented fixed reference rates: units of currency per 1 USD
RATES_PER_USD = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 151.0, "CNY": 7.2, "INR": 83.0, "CAD": 1.36,
                 "AUD": 1.52, "CHF": 0.88, "KRW": 1350.0}


class Fact(NamedTuple):
    title: str
    value: float
    unit: str


TRAIN_FACTS = [
    Fact("height of Mount Everest", 8849, "m"),
    Fact("height of Mount Kilimanjaro", 5895, "m"),
    Fact("height of Mont Blanc", 4806, "m"),
    Fact("height of the Eiffel Tower", 330, "m"),
    Fact("height of the Burj Khalifa", 828, "m"),
    Fact("height of the Statue of Liberty", 93, "m"),
    Fact("maximum depth of Lake Baikal", 1642, "m"),
    Fact("depth of the Mariana Trench", 10994, "m"),
    Fact("length of the Nile", 6650, "km"),
    Fact("length of the Amazon River", 6400, "km"),
    Fact("length of a marathon", 42.195, "km"),
    Fact("average distance from the Earth to the Moon", 384400, "km"),
]


class Element(NamedTuple):
    symbol: str
    name: str
    atomic_number: int
    atomic_mass: float


HELDOUT_ELEMENTS = [
    Element("H", "hydrogen", 1, 1.008), Element("He", "helium", 2, 4.0026), Element("C", "carbon", 6, 12.011),
    Element("N", "nitrogen", 7, 14.007), Element("O", "oxygen", 8, 15.999), Element("Ne", "neon", 10, 20.18),
    Element("Na", "sodium", 11, 22.99), Element("Si", "silicon", 14, 28.085), Element("Fe", "iron", 26, 55.845),
    Element("Cu", "copper", 29, 63.546), Element("Ag", "silver", 47, 107.87), Element("Au", "gold", 79, 196.97),
    Element("Hg", "mercury", 80, 200.59), Element("Pb", "lead", 82, 207.2), Element("U", "uranium", 92, 238.03),
]
ELEMENTS = {e.symbol: e for e in HELDOUT_ELEMENTS}

# invented shop prices (USD) for the held-out shopping-cart environment
HELDOUT_CATALOG = {"notebook": 3.5, "pen": 1.25, "backpack": 39.99, "water bottle": 12.0, "headphones": 59.0,
                   "stapler": 8.75, "umbrella": 15.5, "desk lamp": 24.0}
TRAIN_TODOS = ["buy milk", "call the dentist", "water the plants", "pay the electricity bill", "book a haircut",
               "renew my passport", "clean the garage", "email the landlord", "pick up the dry cleaning",
               "return the library books"]

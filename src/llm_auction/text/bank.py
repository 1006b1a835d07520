"""The sentence bank: categories, their topics, and how people write about them (public language).

The vocabulary is deliberately small (a few hundred words) so that a tiny word-level language
model can learn it, yet every text is natural language a sentence encoder can embed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    """A topic inside a category: what a query asks about and what an ad sells."""

    name: str
    products: tuple[str, ...]
    tips: tuple[str, ...]


@dataclass(frozen=True)
class Category:
    name: str
    interest: str
    topics: tuple[Topic, ...]


CATEGORIES: tuple[Category, ...] = (
    Category(
        "travel",
        "travel and new places",
        (
            Topic(
                "flights",
                ("cheap flights", "airline tickets", "flight deals"),
                ("book about six weeks ahead", "compare fares on weekdays", "pack a light bag"),
            ),
            Topic(
                "hotels",
                ("hotel rooms", "city hotels", "beach resorts"),
                ("read recent guest reviews", "stay close to the centre", "ask for a late checkout"),
            ),
            Topic(
                "gear",
                ("travel backpacks", "carry on luggage", "packing cubes"),
                ("choose a bag with a warranty", "roll your clothes", "keep documents in one pocket"),
            ),
        ),
    ),
    Category(
        "fitness",
        "sport and fitness",
        (
            Topic(
                "running",
                ("running shoes", "trail shoes", "running watches"),
                ("build distance slowly", "rest one day a week", "warm up before you run"),
            ),
            Topic(
                "gym",
                ("gym memberships", "home weights", "yoga mats"),
                ("train each muscle twice a week", "focus on good form", "track your progress"),
            ),
            Topic(
                "nutrition",
                ("protein powder", "meal plans", "sports drinks"),
                ("eat enough protein", "drink water through the day", "plan meals for the week"),
            ),
        ),
    ),
    Category(
        "finance",
        "money and saving",
        (
            Topic(
                "saving",
                ("savings accounts", "budget apps", "high interest accounts"),
                ("save a fixed share of income", "track every expense", "keep an emergency fund"),
            ),
            Topic(
                "investing",
                ("index funds", "investment apps", "retirement plans"),
                ("start early and stay patient", "keep fees low", "spread your risk"),
            ),
            Topic(
                "credit",
                ("credit cards", "cash back cards", "credit reports"),
                ("pay the full balance each month", "check your report every year", "compare the yearly fee"),
            ),
        ),
    ),
    Category(
        "cooking",
        "food and cooking",
        (
            Topic(
                "kitchen",
                ("chef knives", "cast iron pans", "kitchen scales"),
                ("keep your knives sharp", "heat the pan before cooking", "weigh flour for baking"),
            ),
            Topic(
                "recipes",
                ("recipe boxes", "cooking classes", "meal kits"),
                ("cook simple meals first", "prepare ingredients before you start", "taste as you go"),
            ),
            Topic(
                "coffee",
                ("coffee beans", "espresso machines", "coffee grinders"),
                ("grind beans just before brewing", "use fresh water", "store beans in the dark"),
            ),
        ),
    ),
    Category(
        "tech",
        "technology and gadgets",
        (
            Topic(
                "laptops",
                ("light laptops", "gaming laptops", "laptop stands"),
                ("check the battery life", "get enough memory", "compare screen quality"),
            ),
            Topic(
                "phones",
                ("smart phones", "phone cases", "wireless chargers"),
                ("look at the camera tests", "keep the software updated", "use a screen guard"),
            ),
            Topic(
                "audio",
                ("wireless headphones", "smart speakers", "noise cancelling earbuds"),
                ("try them for comfort", "check the noise cancelling", "compare battery hours"),
            ),
        ),
    ),
    Category(
        "fashion",
        "clothes and style",
        (
            Topic(
                "shoes",
                ("leather boots", "white sneakers", "walking shoes"),
                ("buy shoes in the afternoon", "care for the leather", "try both sizes"),
            ),
            Topic(
                "outerwear",
                ("rain jackets", "wool coats", "down jackets"),
                ("check the seams for rain", "choose layers for winter", "pick a neutral colour"),
            ),
            Topic(
                "accessories",
                ("leather bags", "sun glasses", "simple watches"),
                ("choose one quality piece", "match the leather colours", "keep it simple"),
            ),
        ),
    ),
    Category(
        "home",
        "home and garden",
        (
            Topic(
                "furniture",
                ("sofa beds", "office chairs", "standing desks"),
                ("measure the room first", "sit on it before buying", "check the return policy"),
            ),
            Topic(
                "garden",
                ("garden tools", "seed kits", "outdoor lights"),
                ("water early in the morning", "start with easy plants", "clean tools after use"),
            ),
            Topic(
                "cleaning",
                ("robot vacuums", "steam mops", "air purifiers"),
                ("clean a little every day", "change filters often", "open windows for fresh air"),
            ),
        ),
    ),
    Category(
        "education",
        "learning and courses",
        (
            Topic(
                "languages",
                ("language apps", "online tutors", "phrase books"),
                ("practise a little every day", "speak from the first week", "learn common words"),
            ),
            Topic(
                "coding",
                ("coding courses", "coding bootcamps", "project books"),
                ("build small projects", "read other people's code", "learn one language well"),
            ),
            Topic(
                "exams",
                ("exam prep courses", "practice tests", "study planners"),
                ("make a study plan", "take timed practice tests", "sleep well before the exam"),
            ),
        ),
    ),
)

QUERY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "informational": (
        "how do i choose {product}",
        "what should i know about {topic}",
        "tips for {topic} as a beginner",
    ),
    "commercial": (
        "best {product} this year",
        "where can i buy good {product}",
        "which {product} are worth the money",
    ),
}

AD_TEMPLATES: tuple[str, ...] = (
    "{brand} {product}: {adjective} choice, try it today",
    "save on {product} at {brand}, {adjective} and fast",
    "{brand} has {adjective} {product} for every budget",
    "get {adjective} {product} from {brand} now",
)

ADJECTIVES: tuple[str, ...] = (
    "top rated",
    "simple",
    "trusted",
    "great value",
    "premium",
    "popular",
    "new",
)

BRAND_PARTS: tuple[tuple[str, ...], tuple[str, ...]] = (
    ("nova", "blue", "peak", "bright", "true", "north", "green", "swift", "prime", "urban"),
    ("line", "works", "hub", "lab", "box", "point", "craft", "wave", "nest", "way"),
)

ANSWER_OPENERS: tuple[str, ...] = (
    "Here is what helps with {topic}.",
    "Good question about {topic}.",
    "A few things matter for {topic}.",
)

BRIDGE_TEMPLATES: tuple[str, ...] = (
    "If you need {product}, this one is worth a look.",
    "For {product}, here is a good option.",
    "Many readers like these {product}.",
)
"""Lead-in sentences that introduce the ad after them by naming its product: ad talk, not answer."""

TIP_TEMPLATES: tuple[str, ...] = (
    "First, {tip}.",
    "It also helps to {tip}.",
    "Many people {tip}.",
    "Remember to {tip}.",
)

PROFILE_TEMPLATES: tuple[str, ...] = (
    "a {age} year old who likes {first} and {second}",
    "{age}, into {first}, sometimes {second}",
    "user aged {age} interested in {first} and a bit of {second}",
)

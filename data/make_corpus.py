"""Write data/corpus.txt: a small English-like corpus about an invented valley.

Everything here is made up by this script: a seeded random "world" (people with a trade, a
home town, a pet, a favourite colour and an age; towns with a river, a hill and a product),
then paragraphs of short stories about it drawn from a small grammar: narration, facts,
trade with prices, weather, and dialogue with quotes, questions and contractions.

The facts stay the same all through the text (Maren Tolvek is always a weaver from Essel),
so a small model has something to learn beyond word order. The output depends only on the
seed and the target size:

    python data/make_corpus.py                     # -> data/corpus.txt, about 350 KB
    python data/make_corpus.py --size 12000000 --out /tmp/big.txt
"""
import argparse
import pathlib
import random

# ---------------------------------------------------------------------------------------
# Word lists (written for this project)
# ---------------------------------------------------------------------------------------

TRADES = """baker smith weaver fisher miller potter carpenter shepherd farmer healer merchant
sailor hunter scribe tailor mason brewer cook teacher guard singer painter gardener beekeeper
boatman glassblower candlemaker cartwright cooper herbalist innkeeper jeweler locksmith
messenger miner musician ropemaker saddler tanner thatcher watchman woodcutter clockmaker
bookbinder dyer fletcher cheesemaker mapmaker""".split()

ANIMALS = [("cat", "cats"), ("dog", "dogs"), ("goat", "goats"), ("horse", "horses"),
           ("donkey", "donkeys"), ("hen", "hens"), ("goose", "geese"), ("duck", "ducks"),
           ("sheep", "sheep"), ("cow", "cows"), ("pig", "pigs"), ("rabbit", "rabbits"),
           ("owl", "owls"), ("crow", "crows"), ("fox", "foxes"), ("hedgehog", "hedgehogs"),
           ("mouse", "mice"), ("frog", "frogs"), ("toad", "toads"), ("heron", "herons"),
           ("otter", "otters"), ("badger", "badgers"), ("deer", "deer"), ("wolf", "wolves"),
           ("bear", "bears"), ("swan", "swans"), ("sparrow", "sparrows"), ("beetle", "beetles"),
           ("moth", "moths"), ("snail", "snails"), ("lizard", "lizards"), ("pony", "ponies"),
           ("lamb", "lambs"), ("calf", "calves"), ("kitten", "kittens"), ("puppy", "puppies"),
           ("parrot", "parrots"), ("trout", "trout"), ("salmon", "salmon"), ("bee", "bees")]

FOODS = [("loaf", "loaves"), ("apple", "apples"), ("pear", "pears"), ("plum", "plums"),
         ("cherry", "cherries"), ("onion", "onions"), ("carrot", "carrots"),
         ("turnip", "turnips"), ("cabbage", "cabbages"), ("potato", "potatoes"),
         ("egg", "eggs"), ("cheese", "cheeses"), ("pie", "pies"), ("cake", "cakes"),
         ("biscuit", "biscuits"), ("bun", "buns"), ("sausage", "sausages"),
         ("pumpkin", "pumpkins"), ("melon", "melons"), ("lemon", "lemons"),
         ("walnut", "walnuts"), ("chestnut", "chestnuts"), ("mushroom", "mushrooms"),
         ("pancake", "pancakes"), ("dumpling", "dumplings"), ("herring", "herrings"),
         ("honeycomb", "honeycombs"), ("fig", "figs"), ("peach", "peaches"),
         ("bean", "beans")]

TOOLS = [("hammer", "hammers"), ("saw", "saws"), ("knife", "knives"), ("axe", "axes"),
         ("spade", "spades"), ("rake", "rakes"), ("needle", "needles"), ("rope", "ropes"),
         ("ladder", "ladders"), ("lamp", "lamps"), ("lantern", "lanterns"),
         ("candle", "candles"), ("bucket", "buckets"), ("basket", "baskets"),
         ("barrel", "barrels"), ("net", "nets"), ("oar", "oars"), ("chisel", "chisels"),
         ("brush", "brushes"), ("broom", "brooms"), ("key", "keys"), ("lock", "locks"),
         ("bell", "bells"), ("drum", "drums"), ("flute", "flutes"), ("fiddle", "fiddles"),
         ("kettle", "kettles"), ("pot", "pots"), ("pan", "pans"), ("jug", "jugs"),
         ("cup", "cups"), ("bowl", "bowls"), ("plate", "plates"), ("spoon", "spoons"),
         ("map", "maps"), ("book", "books"), ("letter", "letters"), ("scroll", "scrolls"),
         ("compass", "compasses"), ("clock", "clocks"), ("mirror", "mirrors"),
         ("blanket", "blankets"), ("cloak", "cloaks"), ("hat", "hats"), ("boot", "boots"),
         ("glove", "gloves"), ("scarf", "scarves"), ("ring", "rings"), ("coin", "coins"),
         ("box", "boxes"), ("chest", "chests"), ("sack", "sacks"), ("wheel", "wheels"),
         ("cart", "carts"), ("boat", "boats"), ("sail", "sails"), ("thread", "threads"),
         ("button", "buttons"), ("shovel", "shovels"), ("stool", "stools"),
         ("table", "tables"), ("chair", "chairs"), ("pillow", "pillows"),
         ("whistle", "whistles"), ("kite", "kites"), ("paintbrush", "paintbrushes"),
         ("bottle", "bottles"), ("jar", "jars"), ("feather", "feathers"), ("pebble", "pebbles")]

PLACES = """market harbor bridge mill forest hill meadow orchard garden well square
library school bakery forge workshop inn tavern chapel tower gate wall field farm barn
stable pond lake shore beach cave valley road lane path quarry dock island cliff
marsh spring fountain kitchen cellar attic shed courtyard hall""".split()

ADJECTIVES = """old young small big tall short quiet loud happy sad kind brave clever
careful busy lazy tired hungry cold warm bright dark heavy light long narrow wide deep
strange gentle proud shy patient curious honest cheerful grumpy polite friendly lonely
clean dirty new broken shiny rusty wooden golden silver soft hard sweet sour fresh stale
round flat smooth rough thin thick wet dry early late famous humble noisy calm wild tidy
crooked sturdy fragile lucky clumsy nimble sleepy stubborn generous""".split()

COLORS = "red blue green yellow white black brown grey orange purple pink amber".split()

PEOPLE_WORDS = [("friend", "friends"), ("neighbor", "neighbors"), ("sister", "sisters"),
                ("brother", "brothers"), ("cousin", "cousins"), ("aunt", "aunts"),
                ("uncle", "uncles"), ("daughter", "daughters"), ("son", "sons"),
                ("grandmother", "grandmothers"), ("grandfather", "grandfathers"),
                ("apprentice", "apprentices"), ("child", "children"),
                ("traveler", "travelers"), ("stranger", "strangers")]

# base, third person, past, -ing; grouped by what they act on
VERBS_FOOD = [("eat", "eats", "ate", "eating"), ("cook", "cooks", "cooked", "cooking"),
              ("bake", "bakes", "baked", "baking"), ("buy", "buys", "bought", "buying"),
              ("sell", "sells", "sold", "selling"), ("share", "shares", "shared", "sharing"),
              ("pick", "picks", "picked", "picking"), ("wash", "washes", "washed", "washing"),
              ("slice", "slices", "sliced", "slicing"), ("taste", "tastes", "tasted", "tasting"),
              ("gather", "gathers", "gathered", "gathering"),
              ("store", "stores", "stored", "storing")]
VERBS_TOOL = [("carry", "carries", "carried", "carrying"), ("fix", "fixes", "fixed", "fixing"),
              ("clean", "cleans", "cleaned", "cleaning"), ("find", "finds", "found", "finding"),
              ("lose", "loses", "lost", "losing"), ("make", "makes", "made", "making"),
              ("borrow", "borrows", "borrowed", "borrowing"), ("lend", "lends", "lent", "lending"),
              ("paint", "paints", "painted", "painting"), ("hide", "hides", "hid", "hiding"),
              ("polish", "polishes", "polished", "polishing"),
              ("sharpen", "sharpens", "sharpened", "sharpening"),
              ("drop", "drops", "dropped", "dropping"), ("hold", "holds", "held", "holding"),
              ("open", "opens", "opened", "opening"), ("mend", "mends", "mended", "mending"),
              ("wrap", "wraps", "wrapped", "wrapping"), ("bring", "brings", "brought", "bringing")]
VERBS_ANIMAL = [("feed", "feeds", "fed", "feeding"), ("brush", "brushes", "brushed", "brushing"),
                ("watch", "watches", "watched", "watching"),
                ("follow", "follows", "followed", "following"),
                ("chase", "chases", "chased", "chasing"), ("count", "counts", "counted", "counting"),
                ("call", "calls", "called", "calling"), ("train", "trains", "trained", "training"),
                ("walk", "walks", "walked", "walking"), ("pet", "pets", "petted", "petting")]
VERBS_PLACE = [("visit", "visits", "visited", "visiting"),
               ("leave", "leaves", "left", "leaving"), ("reach", "reaches", "reached", "reaching"),
               ("cross", "crosses", "crossed", "crossing"),
               ("sweep", "sweeps", "swept", "sweeping"),
               ("guard", "guards", "guarded", "guarding"),
               ("explore", "explores", "explored", "exploring"),
               ("search", "searches", "searched", "searching")]
VERBS_MOVE = [("walk", "walks", "walked", "walking"), ("run", "runs", "ran", "running"),
              ("ride", "rides", "rode", "riding"), ("hurry", "hurries", "hurried", "hurrying"),
              ("go", "goes", "went", "going"), ("climb", "climbs", "climbed", "climbing"),
              ("wander", "wanders", "wandered", "wandering"),
              ("sail", "sails", "sailed", "sailing"), ("come", "comes", "came", "coming"),
              ("return", "returns", "returned", "returning")]
VERBS_ALONE = [("sing", "sings", "sang", "singing"), ("sleep", "sleeps", "slept", "sleeping"),
               ("laugh", "laughs", "laughed", "laughing"), ("work", "works", "worked", "working"),
               ("rest", "rests", "rested", "resting"), ("wait", "waits", "waited", "waiting"),
               ("read", "reads", "read", "reading"), ("whistle", "whistles", "whistled", "whistling"),
               ("dance", "dances", "danced", "dancing"), ("sigh", "sighs", "sighed", "sighing"),
               ("smile", "smiles", "smiled", "smiling"), ("listen", "listens", "listened", "listening")]

TIMES = ["in the morning", "at dawn", "at noon", "in the afternoon", "in the evening",
         "at dusk", "at night", "before breakfast", "after supper", "at midnight",
         "before sunrise", "after the rain"]
DAYS = "Moonday Twosday Midweek Thornday Freeday Marketday Restday".split()
SEASONS = ["spring", "summer", "autumn", "winter"]
WEATHER = ["rain", "snow", "wind", "fog", "frost", "sunshine", "thunder", "hail", "mist"]
SEASON_ADJECTIVES = ["mild", "harsh", "long", "short", "wet", "dry", "cold", "warm", "windy",
                     "gentle", "stormy", "quiet"]
DIRECTIONS = ["north", "south", "east", "west"]
NUMBERS = """zero one two three four five six seven eight nine ten eleven twelve thirteen
fourteen fifteen sixteen seventeen eighteen nineteen twenty""".split()
TENS = {20: "twenty", 30: "thirty", 40: "forty", 50: "fifty", 60: "sixty", 70: "seventy", 80: "eighty",
        90: "ninety"}
GREETINGS = ["Good morning", "Hello", "Good evening", "Well met", "Greetings", "Good day"]
FEELINGS = ["glad", "sorry", "afraid", "sure", "certain", "worried", "pleased", "surprised"]
CONNECTIVES = ["Then", "Later", "Soon", "After that", "Meanwhile", "At last", "Suddenly",
               "Before long", "That day", "Afterwards"]

MATERIALS = """wool flax clay iron copper tin oak pine birch leather wax glass stone timber
straw reed silk linen willow slate bone horn amber ash elm""".split()
HOUSE_PARTS = ["door", "roof", "chimney", "window", "gate", "fence", "porch", "stair", "shutter"]
LOOKS = [("hair", ["long", "short", "curly", "grey", "dark", "red", "thin", "wild"]),
         ("eyes", ["blue", "green", "brown", "grey", "sharp", "tired", "kind", "bright"]),
         ("hands", ["rough", "strong", "steady", "small", "quick", "scarred", "gentle"]),
         ("voice", ["deep", "soft", "loud", "hoarse", "warm", "thin", "cheerful"])]
WONDERS = ["glowed at night", "could talk", "never slept", "sang in the rain",
           "counted the stars", "guarded a buried treasure", "was older than the hills",
           "knew every road in the valley", "ate only honey", "walked backwards",
           "vanished every winter", "spoke in riddles"]
REASONS = ["because the road was flooded", "because the bridge had fallen",
           "because a storm was coming", "because the festival was near",
           "because the harvest was late", "because a letter had arrived",
           "because the mill had stopped", "because the well was dry",
           "because the bell had cracked", "because guests were expected"]
FESTIVALS = ["Lantern Night", "the Harvest Fair", "the Spring Dance", "Frost Market",
             "the Boat Race", "Bell Day"]

SYL_START = "b br d f g h k l m n p r s t th v w z".split()
SYL_VOWEL = "a e i o u a e i o u ai ea ie ou".split()
SYL_END = "n l r s th k m nd rk st".split()


# ---------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------

def number_words(n):
    """0 <= n < 1000 in words: 42 -> forty-two, 150 -> a hundred and fifty."""
    if n >= 100:
        hundreds = "a hundred" if n < 200 else f"{NUMBERS[n // 100]} hundred"
        return hundreds if n % 100 == 0 else f"{hundreds} and {number_words(n % 100)}"
    if n < len(NUMBERS):
        return NUMBERS[n]
    tens = n // 10 * 10
    word = TENS[tens]
    return word if n == tens else f"{word}-{NUMBERS[n - tens]}"


def coins(amount, n):
    return f"{amount} coin" if n == 1 else f"{amount} coins"


def a_or_an(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def invent_name(rng, syllables):
    parts = []
    for i in range(syllables):
        part = rng.choice(SYL_START) + rng.choice(SYL_VOWEL)
        if (i == syllables - 1 and rng.random() < 0.7) or rng.random() < 0.15:
            part += rng.choice(SYL_END)
        parts.append(part)
    return "".join(parts).capitalize()


def invent_names(rng, n, syllables, taken):
    names = []
    while len(names) < n:
        name = invent_name(rng, rng.choice(syllables))
        if name.lower() not in taken and 3 <= len(name) <= 8:
            taken.add(name.lower())
            names.append(name)
    return names


def zipf_weights(n, s=0.9):
    return [1.0 / (k + 1) ** s for k in range(n)]


class World:
    def __init__(self, rng):
        taken = set()
        self.capital = invent_names(rng, 1, [2], taken)[0]
        self.towns = invent_names(rng, 30, [2, 3], taken)
        self.rivers = invent_names(rng, 10, [2], taken)
        self.hills = invent_names(rng, 10, [2], taken)
        firsts = invent_names(rng, 150, [2, 3], taken)
        lasts = invent_names(rng, 60, [2, 3], taken)
        pet_names = invent_names(rng, 60, [1, 2], taken)
        self.town_info = {}
        for town in self.towns:
            self.town_info[town] = {
                "river": rng.choice(self.rivers), "hill": rng.choice(self.hills),
                "direction": rng.choice(DIRECTIONS),
                "product": rng.choice(FOODS + TOOLS), "days": rng.randint(1, 9)}
        self.people = []
        for i, first in enumerate(firsts):
            self.people.append({
                "first": first, "last": rng.choice(lasts), "she": "she" if i % 2 else "he",
                "trade": rng.choice(TRADES), "town": rng.choice(self.towns),
                "pet": rng.choice(ANIMALS), "pet_name": rng.choice(pet_names),
                "color": rng.choice(COLORS),
                "age": rng.randint(9, 80), "relation": rng.choice(PEOPLE_WORDS[:12])[0],
                "food": rng.choice(FOODS),
                "looks": [(part, rng.choice(words)) for part, words in LOOKS],
                "door": rng.choice(COLORS), "windows": rng.randint(1, 9)})
        self.trade_info = {trade: {"material": rng.choice(MATERIALS),
                                   "product": rng.choice(TOOLS)} for trade in TRADES}
        self.wonders = {hill: (rng.choice(ANIMALS), rng.choice(WONDERS)) for hill in self.hills}
        self.festivals = {town: rng.choice(FESTIVALS) for town in self.towns}
        self.prices = {thing[0]: rng.randint(1, 30) for thing in FOODS + TOOLS}
        self.person_weights = zipf_weights(len(self.people), 0.6)
        self.food_weights = zipf_weights(len(FOODS))
        self.tool_weights = zipf_weights(len(TOOLS))
        self.place_weights = zipf_weights(len(PLACES))
        self.adj_weights = zipf_weights(len(ADJECTIVES), 0.7)


# ---------------------------------------------------------------------------------------
# The grammar
# ---------------------------------------------------------------------------------------

class Writer:
    def __init__(self, rng, world):
        self.rng, self.w = rng, world

    # small pickers
    def pick(self, items, weights=None):
        return self.rng.choices(items, weights)[0] if weights else self.rng.choice(items)

    def person(self, other_than=None):
        while True:
            p = self.pick(self.w.people, self.w.person_weights)
            if p is not other_than:
                return p

    def adj(self):
        return self.pick(ADJECTIVES, self.w.adj_weights)

    def food(self):
        return self.pick(FOODS, self.w.food_weights)

    def tool(self):
        return self.pick(TOOLS, self.w.tool_weights)

    def place(self):
        return self.pick(PLACES, self.w.place_weights)

    def count(self, noun, hi=12):
        n = self.rng.randint(2, hi)
        return f"{number_words(n)} {noun[1]}"

    @staticmethod
    def his(p):
        return "her" if p["she"] == "she" else "his"

    @staticmethod
    def him(p):
        return "her" if p["she"] == "she" else "him"

    # sentences about one person p
    def intro(self, p):
        return self.pick([
            f"In the town of {p['town']} there lived {a_or_an(self.adj())} {p['trade']} "
            f"named {p['first']} {p['last']}.",
            f"{p['first']} {p['last']} was {a_or_an(p['trade'])} from {p['town']}.",
            f"Everyone in {p['town']} knew {p['first']}, the {p['trade']}.",
            f"{p['first']} was {number_words(p['age'])} years old"
            f" and worked as {a_or_an(p['trade'])} in {p['town']}."])

    def pet(self, p):
        pet = p["pet"]
        return self.pick([
            f"{p['first']} had {a_or_an(p['color'])} {pet[0]} that slept by the door.",
            f"{p['she'].capitalize()} kept {a_or_an(pet[0])} called {p['pet_name']}.",
            f"The {pet[0]} of {p['first']} liked to {self.pick(VERBS_ALONE)[0]} in the "
            f"{self.place()}.",
            f"{p['first']}'s {pet[0]} was {self.adj()} and {self.adj()}."])

    def habit(self, p):
        v = self.pick(VERBS_FOOD)
        f = self.food()
        t = self.pick(VERBS_TOOL)
        return self.pick([
            f"Every {self.pick(DAYS)}, {p['first']} {v[1]} {self.count(f)} at the "
            f"{self.place()}.",
            f"{self.pick(TIMES).capitalize()}, {p['first']} {t[1]} the {self.tool()[0]} "
            f"near the {self.place()}.",
            f"{p['first']} always wears {a_or_an(p['color'])} {self.pick(['hat', 'cloak', 'scarf'])}.",
            f"The favorite food of {p['first']} is {p['food'][0]} {self.pick(['pie', 'soup', 'bread'])}.",
            f"{p['she'].capitalize()} {self.pick(VERBS_ALONE)[1]} {self.pick(TIMES)}."])

    def event(self, p):
        m = self.pick(VERBS_MOVE)
        q = self.person(p)
        v = self.pick(VERBS_TOOL)
        a = self.pick(ANIMALS)
        t1, t2 = self.rng.sample(TOOLS, 2)
        return self.pick([
            f"On {self.pick(DAYS)} {p['first']} {m[2]} to the {self.place()} with "
            f"{self.his(p)} {p['relation']}.",
            f"{self.pick(CONNECTIVES)}, {p['first']} {v[2]} {a_or_an(self.adj())} "
            f"{self.tool()[0]} and gave it to {q['first']}.",
            f"{p['first']} {self.pick(VERBS_ANIMAL)[2]} the {a[1]} until it was "
            f"{self.pick(['dark', 'late', 'time for supper', 'raining', 'too cold'])}.",
            f"{self.pick(CONNECTIVES)}, {p['she']} {self.pick(VERBS_PLACE)[2]} the "
            f"{self.place()} and found {self.count(self.tool(), 9)}.",
            f"While {self.pick(VERBS_ALONE)[3]}, {p['first']} saw {a_or_an(self.adj())} "
            f"{a[0]} by the river {self.w.town_info[p['town']]['river']}.",
            f"{p['first']} and {q['first']} {m[2]} to {q['town']}; it took "
            f"{number_words(self.w.town_info[q['town']]['days'])} days.",
            f"{p['first']} packed three things: {a_or_an(t1[0])}, "
            f"{a_or_an(self.food()[0])} and {a_or_an(t2[0])}."])

    def trade(self, p):
        thing = self.food() if self.rng.random() < 0.5 else self.tool()
        price = self.w.prices[thing[0]]
        n = self.rng.randint(2, 5)
        other = self.food()
        while other is thing:
            other = self.food()
        return self.pick([
            f"At the market, one {thing[0]} costs {coins(number_words(price), price)}.",
            f"{p['first']} sold {number_words(n)} {thing[1]} for "
            f"{coins(number_words(n * price), n * price)}.",
            f"{p['first']} bought {a_or_an(thing[0])} for {coins(number_words(price), price)} "
            f"(the price had not changed in years).",
            f"In {p['town']}, {a_or_an(thing[0])} costs {coins(str(price), price)} and "
            f"{a_or_an(other[0])} costs {self.w.prices[other[0]]}."])

    def weather(self, p):
        season = self.pick(SEASONS)
        return self.pick([
            f"The {season} in {p['town']} was {self.pick(SEASON_ADJECTIVES)}, and the {self.pick(WEATHER)} came "
            f"from the {self.pick(DIRECTIONS)}.",
            f"That {season}, there was {self.pick(WEATHER)} every day.",
            f"It was {self.pick(['cold', 'warm', 'windy', 'grey', 'bright'])} "
            f"{self.pick(TIMES)}, so {p['first']} stayed in the {self.place()}."])

    def fact(self, p):
        town = p["town"] if self.rng.random() < 0.7 else self.pick(self.w.towns)
        info = self.w.town_info[town]
        return self.pick([
            f"{town} lies {info['direction']} of {self.w.capital}, beside the river "
            f"{info['river']}.",
            f"From {town} you can see the hill {info['hill']}.",
            f"{town} is famous for its {info['product'][1]}.",
            f"It takes {number_words(info['days'])} days to walk from {town} to "
            f"{self.w.capital}."])

    def dialogue(self, p):
        q = self.person(p)
        f, t = self.food(), self.tool()
        said = self.pick(["said", "called", "whispered", "answered", "replied"])
        lines = [
            [f'"{self.pick(GREETINGS)}, {q["first"]}," said {p["first"]}. '
             f'"I don\'t have any {f[1]} today."',
             f'"That\'s all right," {q["first"]} {said}. "I\'ll come back on {self.pick(DAYS)}."'],
            [f'"Where is my {t[0]}?" asked {p["first"]}.',
             f'"It\'s in the {self.place()}," {q["first"]} replied, "next to the {self.tool()[0]}."'],
            [f'"Can you help me?" {p["first"]} asked. "The {t[0]} is {self.pick(["broken", "lost", "stuck", "too heavy"])}."',
             f'"Of course," said {q["first"]}. "We\'ll fix it {self.pick(TIMES)}."'],
            [f'"I\'m {self.pick(FEELINGS)} about the {self.pick(WEATHER)}," said {p["first"]}.',
             f'"Don\'t worry," {q["first"]} answered. "It won\'t last."'],
            [f'{q["first"]} asked, "How many {self.pick(ANIMALS)[1]} do you have?"',
             f'"{number_words(self.rng.randint(2, 12)).capitalize()}," said {p["first"]}, '
             f'"and one {p["pet"][0]}."'],
            [f'"Isn\'t this {a_or_an(self.adj())} day?" {p["first"]} said.',
             f'"It is!" laughed {q["first"]}. "Let\'s go to the {self.place()}."'],
            [f'"What do you do, {p["first"]}?" asked the {self.pick(PEOPLE_WORDS)[0]}.',
             f'"I\'m {a_or_an(p["trade"])}," {p["she"]} {said}. "I work in {p["town"]}."'],
            [f'"You can\'t carry all those {t[1]}!" said {q["first"]}.',
             f'"I can, and I will," {p["first"]} answered.'],
        ]
        return " ".join(self.pick(lines))

    def craft(self, p):
        info = self.w.trade_info[p["trade"]]
        return self.pick([
            f"As {a_or_an(p['trade'])}, {p['first']} worked with {info['material']} and made "
            f"{info['product'][1]}.",
            f"{p['first']} needed more {info['material']} {self.pick(REASONS)}.",
            f"The {info['material']} that {p['first']} used came from the hill "
            f"{self.w.town_info[p['town']]['hill']}.",
            f"{p['first']} had {p['looks'][0][1]} hair, {p['looks'][1][1]} eyes and "
            f"{p['looks'][2][1]} hands.",
            f"{p['first']} spoke in {a_or_an(p['looks'][3][1])} voice.",
            f"The house of {p['first']} had {a_or_an(p['door'])} door and "
            f"{number_words(p['windows'])} windows.",
            f"One day the {self.pick(HOUSE_PARTS)} of {p['first']}'s house broke, so "
            f"{p['she']} {self.pick(['called', 'asked', 'paid'])} {a_or_an(self.pick(TRADES))} to "
            f"mend it."])

    def legend(self, p):
        hill = self.pick(self.w.hills)
        animal, wonder = self.w.wonders[hill]
        town = p["town"]
        return self.pick([
            f"People in {town} said that the {animal[0]} of the hill {hill} {wonder}.",
            f"{p['first']} did not believe that the {animal[0]} of {hill} {wonder}.",
            f"Every year {town} celebrates {self.w.festivals[town]}, and {p['first']} "
            f"{self.pick(VERBS_ALONE)[1]} until {self.pick(['dawn', 'midnight', 'the bells ring'])}.",
            f"{p['first']} stayed home {self.pick(REASONS)}.",
            f"Nobody knew why the {self.pick(ANIMALS)[1]} left the {self.place()}, but "
            f"{p['first']} thought it was {self.pick(REASONS)}."])

    def paragraph(self):
        p = self.person()
        sentences = [self.intro(p)]
        kinds = [self.pet, self.habit, self.event, self.trade, self.weather, self.fact,
                 self.dialogue, self.craft, self.legend]
        weights = [1, 2, 3, 1.5, 1, 1, 2.5, 1.5, 1]
        for _ in range(self.rng.randint(3, 8)):
            sentences.append(self.rng.choices(kinds, weights)[0](p))
        return " ".join(sentences)


def generate(seed, size):
    rng = random.Random(seed)
    writer = Writer(rng, World(rng))
    out, total, chapter = [], 0, 0
    while total < size:
        if len(out) % 25 == 0:
            chapter += 1
            heading = f"Chapter {chapter}"
            out.append(heading)
            total += len(heading) + 2
        para = writer.paragraph()
        out.append(para)
        total += len(para.encode("utf-8")) + 2
    return "\n\n".join(out) + "\n"


def main():
    here = pathlib.Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1234, help="generator seed (default: 1234)")
    ap.add_argument("--size", type=int, default=350_000,
                    help="approximate size in bytes (default: 350000)")
    ap.add_argument("--out", default=str(here / "corpus.txt"),
                    help="output file (default: data/corpus.txt)")
    args = ap.parse_args()
    text = generate(args.seed, args.size)
    pathlib.Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {len(text.encode('utf-8'))} bytes")


if __name__ == "__main__":
    main()

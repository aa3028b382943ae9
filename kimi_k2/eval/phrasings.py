"""User phrasings of the reference episodes (scenarios.py), one list per scenario and split. A held-out phrasing never
appears in the train lists (`kimi_k2.data.heldout.check_heldout` verifies it, and the user messages built from them, on
generated data)."""

from __future__ import annotations

USER: dict[str, dict[str, list[str]]] = {
    # ---- train-only tools
    "weather": {"train": ["What's the weather like in {city}?", "How is the weather in {city} right now?",
                          "Is it cold in {city} today?", "Check the current weather in {city} for me.",
                          "weather in {city}?"]},
    "weather_f": {"train": ["What's the temperature in {city} in Fahrenheit?",
                            "How warm is it in {city}? Give me Fahrenheit please."]},
    "calc": {"train": ["What is {expr}?", "Can you work out {expr} for me?", "Calculate {expr}.",
                       "Quick math: {expr} = ?"]},
    "units": {"train": ["How many {to_name} is {value} {from_name}?", "Convert {value} {from_name} to {to_name}.",
                        "What is {value} {from_unit} in {to_unit}?"]},
    "currency": {"train": ["How much is {amount} {from_currency} in {to_currency}?",
                           "Convert {amount} {from_currency} to {to_currency}, please.",
                           "I have {amount} {from_currency}. What is that in {to_currency}?"]},
    "timezone": {"train": ["If it's {time} in {from_city}, what time is it in {to_city}?",
                           "When it is {time} in {from_city}, what's the local time in {to_city}?",
                           "I have a call at {time} {from_city} time. What time is that in {to_city}?"]},
    "add_days": {"train": ["What date is {days} days after {date}?", "Which day is it {days} days from {date}?",
                           "Starting on {date}, what's the date after {days} days?"]},
    "fact": {"train": ["What is the {title}?", "Look up the {title} for me.", "Do you know the {title}?"]},
    "fact_convert": {"train": ["What is the {title} in {to_name}?", "Tell me the {title}, converted to {to_name}."]},
    "currency_split": {"train": ["I have {amount} {from_currency}. Convert it to {to_currency} and split it "
                                 "evenly between {k} people.",
                                 "Change {amount} {from_currency} into {to_currency}, then divide it by {k}."]},
    "todo_add": {"train": ["Add '{title}' to my to-do list.", "Please put '{title}' on my tasks.",
                           "Remind me to {title}: add it to my list."]},
    "todo_list": {"train": ["What's on my to-do list?", "Show me my tasks.", "List everything I still have to do."]},
    # ---- held-out-only tools
    "forecast": {"heldout": ["Give me the {days}-day forecast for {city}.",
                             "What highs are expected in {city} over the next {days} days?",
                             "Forecast for {city}, {days} days ahead?"]},
    "temperature": {"heldout": ["What is {value} degrees {from_scale} in {to_scale}?",
                                "Turn {value} {from_scale} into {to_scale}.",
                                "A reading of {value} {from_scale}: how much is that in {to_scale}?"]},
    "days_between": {"heldout": ["How many days are there from {start_date} to {end_date}?",
                                 "Count the days between {start_date} and {end_date}.",
                                 "From {start_date} until {end_date} is how many days?"]},
    "element": {"heldout": ["What is the atomic number of the element {symbol}?",
                            "Which element has the symbol {symbol}, and what is its atomic number?",
                            "Tell me about element {symbol}: its atomic number, please."]},
    "distance": {"heldout": ["How far is it from {from_city} to {to_city}?",
                             "What's the distance between {from_city} and {to_city} as the crow flies?",
                             "Kilometres from {from_city} to {to_city}?"]},
    "split_bill": {"heldout": ["Dinner for {people} came to {total} dollars. With a {tip_percent}% tip, what does "
                               "each of us pay?",
                               "Split a {total} dollar bill between {people} people, adding {tip_percent}% tip.",
                               "Our tab is {total} dollars, {people} of us, tip {tip_percent}%: share per person?"]},
    "forecast_f": {"heldout": ["What will tomorrow's high in {city} be in fahrenheit?",
                               "Tomorrow in {city}: how hot will it get, in degrees fahrenheit?"]},
    "cart_add": {"heldout": ["Put {quantity} x {item} in my cart.", "I'd like to buy {quantity} {item}; add them to "
                             "the cart.", "Add {item} to my basket, quantity {quantity}."]},
    "cart_total": {"heldout": ["What's my cart total now?", "How much does my basket come to?",
                               "Show me the cart and the total."]},
    # ---- no tool: both splits, disjoint phrasings
    "identity": {"train": ["Who are you?", "Introduce yourself.", "What's your name?", "Who made you?",
                           "Hi! What are you?", "Tell me who you are in one sentence."],
                 "heldout": ["What should I call you, and who built you?", "Tell me a little about yourself.",
                             "Which company created you?", "Are you ChatGPT?", "Hello there, what kind of AI are "
                             "you?"]},
    "arith_add": {"train": ["What is {a} plus {b}?", "Add {a} and {b}.", "{a} + {b} = ?"],
                  "heldout": ["Compute the sum of {a} and {b}.", "What do {a} and {b} add up to?"]},
    "arith_sub": {"train": ["What is {a} minus {b}?", "Subtract {b} from {a}."],
                  "heldout": ["What do you get if you take {b} away from {a}?", "How much is {a} less {b}?"]},
    "arith_mul": {"train": ["What is {a} times {b}?", "Multiply {a} by {b}.", "{a} * {b} = ?"],
                  "heldout": ["What is the product of {a} and {b}?", "How much is {a} multiplied by {b}?"]},
    "capital": {"train": ["What is the capital of {country}?", "Which city is the capital of {country}?",
                          "capital of {country}?"],
                "heldout": ["Name the capital city of {country}.", "{country}'s capital is which city?"]},
    # requests that no offered tool can serve
    "refusal": {"train": ["Book me a flight to Paris next Friday.", "Send an email to my boss saying I'll be late.",
                          "Order a large pizza for delivery.", "Play some jazz music.",
                          "Turn off the living room lights.", "Translate my resume into German and upload it."],
                "heldout": ["Reserve a table for two at an Italian restaurant tonight.",
                            "Transfer some money to my sister's bank account.", "Set an alarm for early tomorrow.",
                            "Post this photo to my social media.", "Call a taxi to the airport.",
                            "Schedule a video meeting with my team for Monday.", "Unlock my front door remotely.",
                            "Buy two concert tickets for Saturday.", "Print this document on the office printer.",
                            "Renew my car insurance online."]},
}

# joining two requests into one message for parallel tool calls
CONNECT = {"train": ["{a} Also, {b}", "Two things. {a} And {b}"],
           "heldout": ["{a} Plus, {b}", "{a} Then tell me one more thing: {b}"]}

UNIT_NAMES = {"mm": "millimetres", "cm": "centimetres", "m": "metres", "km": "kilometres", "in": "inches",
              "ft": "feet", "mi": "miles", "g": "grams", "kg": "kilograms", "oz": "ounces", "lb": "pounds"}
